"""The pinned maps under pin_dir: can this build use them, and whose are they?

Layout. BCC reuses a pinned map by name and never compares it with the declaration, so pins
left by a build with other structs, or by other [limits], would be used as they are: the
verifier may then reject the program, or worse accept it over a map of another shape.
`layout_differences` compares every pinned map the build declares with the kernel's own
description of it. On a difference the firewall moves the old pins aside (`move_aside`),
lets the build pin fresh maps, fills them from the store and swaps the program on every
interface; the old program keeps filtering with the old maps until that swap.

Identity. The store and the pins each carry the store's random id (`PinIdentity`, and the
store's meta table). Pins claimed by another store are refused, naming both directories,
unless the operator adopts them; pins no store claimed (fresh, or from a build before
identities) are made equal to the store. So a rule is enforced if and only if the API lists it.
"""

from __future__ import annotations

import ctypes
import os
import struct
import time
from dataclasses import dataclass

from xdpfw.dataplane import abi
from xdpfw.dataplane.progs import MAP_FLAGS_COMPARED, MapSpec, map_spec

_KEY = struct.pack("<I", 0)


def declared_spec(bpf, table) -> MapSpec:
    """The map as the compiled source declares it."""
    from bcc.libbcc import lib  # the C library BCC wraps: its module knows the declarations

    # BCC's bindings leave these two undeclared: ctypes would pass the module pointer as a
    # C int and truncate it (a segfault once the module lives above 4 GiB, as in a thread).
    for fn in (lib.bpf_table_key_size_id, lib.bpf_table_leaf_size_id):
        fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_ulonglong], ctypes.c_size_t
    lib.bpf_table_flags_id.argtypes = [ctypes.c_void_p, ctypes.c_ulonglong]
    lib.bpf_table_flags_id.restype = ctypes.c_int
    m, i = bpf.module, table.map_id
    return MapSpec(
        lib.bpf_table_type_id(m, i),
        lib.bpf_table_key_size_id(m, i),
        lib.bpf_table_leaf_size_id(m, i),
        table.max_entries,
        lib.bpf_table_flags_id(m, i) & MAP_FLAGS_COMPARED,
    )


def layout_differences(bpf, pin_dir: str) -> list[str]:
    """One line per pinned map that differs from this build's declaration of it."""
    out = []
    for name in sorted(os.listdir(pin_dir)):
        try:
            table = bpf[name.encode()]
        except KeyError:  # a map of an older build: replacing the pins drops it
            out.append(f"{name}: not declared by this build")
            continue
        want, have = declared_spec(bpf, table), map_spec(table.map_fd)
        if want != have:
            diffs = [
                f"{field} {getattr(have, field)} (wanted {getattr(want, field)})"
                for field in ("type", "key_size", "value_size", "max_entries", "flags")
                if getattr(want, field) != getattr(have, field)
            ]
            out.append(f"{name}: " + ", ".join(diffs))
    return out


def move_aside(pin_dir: str) -> str:
    """Rename pin_dir out of the way (bpffs renames in place; the maps live on while a
    program holds them). Returns the new path."""
    aside = f"{pin_dir.rstrip('/')}-replaced-{int(time.time())}"  # bpffs names have no dots
    os.rename(pin_dir, aside)
    return aside


@dataclass(frozen=True)
class Owner:
    store_id: int  # 0: no store has claimed the pins
    state_dir: str
    generation: int = 0  # the half of the id spaces the kernel's layout uses


class PinIdentity:
    """The pin_identity map: one entry naming the store that claimed the pins."""

    def __init__(self, handle) -> None:
        self.handle = handle

    def read(self) -> Owner:
        raw = self.handle.lookup(_KEY)
        if raw is None:
            return Owner(0, "")
        ident = abi.PinIdentity.from_buffer_copy(raw)
        return Owner(ident.store_id, bytes(ident.state_dir).rstrip(b"\0").decode(
            errors="replace"), ident.generation)

    def write(self, store_id: int, state_dir: str, generation: int) -> None:
        path = os.fsencode(os.path.abspath(state_dir))[: abi.STATE_DIR_LEN]
        ident = abi.PinIdentity(store_id=store_id, generation=generation)
        ctypes.memmove(ident.state_dir, path, len(path))
        self.handle.update(_KEY, bytes(ident))
