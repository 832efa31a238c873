"""Program identity through the bpf() syscall: id and tag of a loaded program, fd from an id.

The id is what `ip link` and bpftool show; an upgrade compares ids, and replaces the attached
program only if it is still the one expected (XDP_FLAGS_REPLACE needs its fd).
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass

SYS_BPF = 321  # x86_64
BPF_OBJ_GET = 7
BPF_PROG_GET_FD_BY_ID = 13
BPF_OBJ_GET_INFO_BY_FD = 15

_libc = ctypes.CDLL(None, use_errno=True)


class _GetFdAttr(ctypes.Structure):
    _fields_ = (("id", ctypes.c_uint32), ("next_id", ctypes.c_uint32), ("flags", ctypes.c_uint32))


class _InfoAttr(ctypes.Structure):
    _fields_ = (
        ("bpf_fd", ctypes.c_uint32),
        ("info_len", ctypes.c_uint32),
        ("info", ctypes.c_uint64),
    )


class _ProgInfoHead(ctypes.Structure):
    """The first fields of struct bpf_prog_info; the kernel fills only info_len bytes."""

    _fields_ = (
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("tag", ctypes.c_uint8 * 8),
        ("jited_prog_len", ctypes.c_uint32),
        ("xlated_prog_len", ctypes.c_uint32),
        ("jited_prog_insns", ctypes.c_uint64),
        ("xlated_prog_insns", ctypes.c_uint64),
        ("load_time", ctypes.c_uint64),
        ("created_by_uid", ctypes.c_uint32),
        ("nr_map_ids", ctypes.c_uint32),
        ("map_ids", ctypes.c_uint64),
        ("name", ctypes.c_char * 16),
    )


@dataclass(frozen=True)
class ProgInfo:
    id: int
    tag: str  # hex, as bpftool prints it
    name: str = ""
    type: int = 0


def _bpf(cmd: int, attr: ctypes.Structure, what: str) -> int:
    rc = _libc.syscall(SYS_BPF, cmd, ctypes.byref(attr), ctypes.sizeof(attr))
    if rc < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return rc


def prog_info(fd: int) -> ProgInfo:
    info = _ProgInfoHead()
    attr = _InfoAttr(bpf_fd=fd, info_len=ctypes.sizeof(info), info=ctypes.addressof(info))
    _bpf(BPF_OBJ_GET_INFO_BY_FD, attr, f"reading program info of fd {fd}")
    return ProgInfo(info.id, bytes(info.tag).hex(), info.name.decode(errors="replace"),
                    info.type)


def prog_fd_by_id(prog_id: int) -> int:
    """A new fd for a loaded program; the caller closes it."""
    return _bpf(BPF_PROG_GET_FD_BY_ID, _GetFdAttr(id=prog_id), f"opening program id {prog_id}")


class _MapInfoHead(ctypes.Structure):
    """The first fields of struct bpf_map_info."""

    _fields_ = (
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("key_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32),
        ("max_entries", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
    )


@dataclass(frozen=True)
class MapSpec:
    """What a map is, as the kernel reports it (and as a build declares it)."""

    type: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int = 0  # only the BPF_F_* bits that change what the map can do (MAP_FLAGS_COMPARED)


BPF_F_NO_PREALLOC = 1 << 0
BPF_F_MMAPABLE = 1 << 10
MAP_FLAGS_COMPARED = BPF_F_NO_PREALLOC | BPF_F_MMAPABLE


def map_spec(fd: int) -> MapSpec:
    info = _MapInfoHead()
    attr = _InfoAttr(bpf_fd=fd, info_len=ctypes.sizeof(info), info=ctypes.addressof(info))
    _bpf(BPF_OBJ_GET_INFO_BY_FD, attr, f"reading map info of fd {fd}")
    return MapSpec(info.type, info.key_size, info.value_size, info.max_entries,
                   info.map_flags & MAP_FLAGS_COMPARED)


class _ObjGetAttr(ctypes.Structure):
    _fields_ = (("pathname", ctypes.c_uint64), ("bpf_fd", ctypes.c_uint32),
                ("file_flags", ctypes.c_uint32))


def obj_get(path: str) -> int:
    """A new fd for the object pinned at `path` (bpffs); the caller closes it."""
    name = ctypes.create_string_buffer(os.fsencode(path))
    return _bpf(BPF_OBJ_GET, _ObjGetAttr(pathname=ctypes.addressof(name)), f"opening pin {path}")
