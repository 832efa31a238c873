"""Program instances: one build's instructions, loaded once per interface slot.

XDP sees only the ingress ifindex, which repeats across network namespaces (every first veth
of a namespace is ifindex 2), and the verifier refuses bpf_get_netns_cookie() in XDP. So an
instance learns its interface from a constant: the program loads XDPFW_SLOT_MARKER in one
ld_imm64, and each instance is a BPF_PROG_LOAD of the build's instructions with that
immediate patched to its slot. BCC compiles once and relocates the map fds into the
instructions; N interfaces then cost N verifications, not N compiles.
"""

from __future__ import annotations

import ctypes
import os
import struct

from xdpfw.dataplane import abi
from xdpfw.dataplane.progs import SYS_BPF, ProgInfo, prog_info
from xdpfw.errors import VerifierError

BPF_PROG_LOAD = 5
BPF_PROG_TYPE_XDP = 6
# What libbpf (and so libxdp, bpftool, ip) gives SEC("xdp") programs. A prog array takes
# tail-call targets of its owner's attach type only, so chaining their programs needs it.
BPF_XDP = 37
LD_IMM64 = 0x18  # BPF_LD | BPF_IMM | BPF_DW: two instruction slots, imm split low/high
INSN = struct.Struct("<BBhi")  # opcode, dst/src registers, offset, immediate
LOG_SIZE = 16 << 20  # the verifier log of a failed load (only then: a log costs time)

_libc = ctypes.CDLL(None, use_errno=True)


class _ProgLoadAttr(ctypes.Structure):
    """The head of union bpf_attr for BPF_PROG_LOAD (the kernel takes zeros for the rest)."""

    _fields_ = (
        ("prog_type", ctypes.c_uint32),
        ("insn_cnt", ctypes.c_uint32),
        ("insns", ctypes.c_uint64),
        ("license", ctypes.c_uint64),
        ("log_level", ctypes.c_uint32),
        ("log_size", ctypes.c_uint32),
        ("log_buf", ctypes.c_uint64),
        ("kern_version", ctypes.c_uint32),
        ("prog_flags", ctypes.c_uint32),
        ("prog_name", ctypes.c_char * 16),
        ("prog_ifindex", ctypes.c_uint32),
        ("expected_attach_type", ctypes.c_uint32),
        ("_rest", ctypes.c_uint8 * 88),
    )


def slot_site(insns: bytes) -> int:
    """Index of the one ld_imm64 of XDPFW_SLOT_MARKER; a build without exactly one cannot
    tell its instances apart, and is refused."""
    sites = []
    for i in range(0, len(insns) // 8 - 1):
        op, _regs, _off, imm = INSN.unpack_from(insns, 8 * i)
        if op == LD_IMM64 and imm == abi.SLOT_MARKER and INSN.unpack_from(insns, 8 * i + 8)[3] == 0:
            sites.append(i)
    if len(sites) != 1:
        raise VerifierError(
            f"the build loads the interface-slot marker {len(sites)} times (needs exactly 1): "
            "iface_slot() must be called once, in xdpfw_main"
        )
    return sites[0]


def patched(insns: bytes, site: int, slot: int) -> bytes:
    op, regs, off, _ = INSN.unpack_from(insns, 8 * site)
    return insns[: 8 * site] + INSN.pack(op, regs, off, slot) + insns[8 * site + 8 :]


class Instance:
    """One loaded instance; closing the fd unloads it once nothing else holds it."""

    def __init__(self, fd: int, slot: int) -> None:
        self.fd = fd
        self.slot = slot

    def info(self) -> ProgInfo:
        return prog_info(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def load_xdp(insns: bytes, name: str, slot: int, entry: str = "xdpfw_main",
             license: bytes = b"GPL") -> Instance:
    """BPF_PROG_LOAD an XDP program (the kernel calls it `name`); a rejection raises
    VerifierError with the log, naming `entry`, the function it was compiled from."""
    code = ctypes.create_string_buffer(insns, len(insns))
    lic = ctypes.create_string_buffer(license)
    attr = _ProgLoadAttr(
        prog_type=BPF_PROG_TYPE_XDP, insn_cnt=len(insns) // 8, insns=ctypes.addressof(code),
        license=ctypes.addressof(lic), prog_name=name.encode()[:15],
        expected_attach_type=BPF_XDP,
    )
    fd = _libc.syscall(SYS_BPF, BPF_PROG_LOAD, ctypes.byref(attr), ctypes.sizeof(attr))
    if fd >= 0:
        return Instance(fd, slot)
    err = ctypes.get_errno()
    # Again with a log, to say why (the verifier is deterministic for the same input).
    log = ctypes.create_string_buffer(LOG_SIZE)
    attr.log_level, attr.log_size, attr.log_buf = 1, LOG_SIZE, ctypes.addressof(log)
    fd = _libc.syscall(SYS_BPF, BPF_PROG_LOAD, ctypes.byref(attr), ctypes.sizeof(attr))
    if fd >= 0:  # passed with a log: a transient failure the first time (ENOMEM)
        return Instance(fd, slot)
    text = log.value.decode(errors="replace")
    raise VerifierError(f"the verifier rejected {entry} (interface slot {slot}): "
                        f"{os.strerror(err)}", text[-20000:])
