"""BPF_PROG_TEST_RUN through the bpf() syscall: run a loaded program on a crafted packet.

Used by the program tests and the benchmarks; BCC's Python bindings have no wrapper for it.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass

SYS_BPF = 321  # x86_64
BPF_PROG_TEST_RUN = 10

XDP_ABORTED, XDP_DROP, XDP_PASS, XDP_TX, XDP_REDIRECT = range(5)
XDP_NAMES = {0: "XDP_ABORTED", 1: "XDP_DROP", 2: "XDP_PASS", 3: "XDP_TX", 4: "XDP_REDIRECT"}


class _TestAttr(ctypes.Structure):
    _fields_ = (
        ("prog_fd", ctypes.c_uint32),
        ("retval", ctypes.c_uint32),
        ("data_size_in", ctypes.c_uint32),
        ("data_size_out", ctypes.c_uint32),
        ("data_in", ctypes.c_uint64),
        ("data_out", ctypes.c_uint64),
        ("repeat", ctypes.c_uint32),
        ("duration", ctypes.c_uint32),
        ("ctx_size_in", ctypes.c_uint32),
        ("ctx_size_out", ctypes.c_uint32),
        ("ctx_in", ctypes.c_uint64),
        ("ctx_out", ctypes.c_uint64),
        ("flags", ctypes.c_uint32),
        ("cpu", ctypes.c_uint32),
        ("batch_size", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32),
    )


class XdpMd(ctypes.Structure):
    """struct xdp_md as passed in ctx_in (lets a test pick the ingress ifindex)."""

    _fields_ = (
        ("data", ctypes.c_uint32),
        ("data_end", ctypes.c_uint32),
        ("data_meta", ctypes.c_uint32),
        ("ingress_ifindex", ctypes.c_uint32),
        ("rx_queue_index", ctypes.c_uint32),
        ("egress_ifindex", ctypes.c_uint32),
    )


@dataclass(frozen=True)
class RunResult:
    retval: int
    data: bytes
    duration_ns: int  # mean per repetition, as the kernel measured it

    @property
    def verdict(self) -> str:
        return XDP_NAMES.get(self.retval, str(self.retval))


_libc = ctypes.CDLL(None, use_errno=True)


def test_run(
    prog_fd: int, packet: bytes, repeat: int = 1, ingress_ifindex: int | None = None
) -> RunResult:
    inb = ctypes.create_string_buffer(packet, len(packet))
    outb = ctypes.create_string_buffer(len(packet) + 256)
    attr = _TestAttr(
        prog_fd=prog_fd,
        data_size_in=len(packet),
        data_size_out=len(outb),
        data_in=ctypes.addressof(inb),
        data_out=ctypes.addressof(outb),
        repeat=repeat,
    )
    if ingress_ifindex is not None:
        ctx = XdpMd(data_end=len(packet), ingress_ifindex=ingress_ifindex)
        attr.ctx_in = ctypes.addressof(ctx)
        attr.ctx_size_in = ctypes.sizeof(ctx)
    if _libc.syscall(SYS_BPF, BPF_PROG_TEST_RUN, ctypes.byref(attr), ctypes.sizeof(attr)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"BPF_PROG_TEST_RUN failed: {os.strerror(err)}")
    return RunResult(attr.retval, outb.raw[: attr.data_size_out], attr.duration)


test_run.__test__ = False  # a helper, not a pytest test, wherever it is imported
