"""The Python mirror of xdpfw_abi.h against what BCC compiled from it, and its constants."""

from __future__ import annotations

import ctypes
import re

import pytest

from xdpfw.dataplane import abi

pytestmark = pytest.mark.bpf


def layout(t) -> tuple:
    """(size, [(field, offset, size)...]) of a ctypes type, recursively comparable."""
    if not hasattr(t, "_fields_"):
        return (ctypes.sizeof(t), [])
    return (
        ctypes.sizeof(t),
        [(name, getattr(t, name).offset, getattr(t, name).size) for name, _ in t._fields_],
    )


@pytest.mark.parametrize("name", sorted(abi.MAP_TYPES))
def test_map_types_match_the_compiled_program(firewall, name):
    key_t, leaf_t = abi.MAP_TYPES[name]
    table = firewall.program.table(name)
    leaf = table.Leaf
    if issubclass(leaf, ctypes.Array):  # per-CPU: BCC's Leaf is an array of the value per CPU
        leaf = leaf._type_
    assert layout(table.Key) == layout(key_t), f"{name} key differs from xdpfw_abi.h"
    assert layout(leaf) == layout(leaf_t), f"{name} value differs from xdpfw_abi.h"


def test_constants_match_the_header():
    text = abi.ABI_HEADER.read_text()
    defines = dict(re.findall(r"#define XDPFW_(\w+)\s+(0x[0-9a-fA-F]+|\d+)", text))
    assert defines, "no constants parsed from the header"
    missing = []
    for cname, value in defines.items():
        mirrored = getattr(abi, cname, None)
        if mirrored is None:
            missing.append(cname)
        elif mirrored != int(value, 0):
            missing.append(f"{cname}: header {value}, abi.py {mirrored}")
    assert not missing, f"xdpfw_abi.h constants not mirrored in abi.py: {missing}"
