"""xdpfw/proxy/abi.py must mirror xdpfw/bpf/sockproxy_abi.h exactly.

The constants are checked against the header text; the structs against the Key/Leaf types
BCC derives from the C declarations when it compiles sockproxy.c (needs the bpf marker).
"""

from __future__ import annotations

import ctypes as ct
import errno
import re
from pathlib import Path

import pytest

from xdpfw.proxy import abi


def c_defines(text: str) -> dict[str, int]:
    return {m[1]: int(m[2], 0)
            for m in re.finditer(r"^#define\s+(SP_\w+)\s+(0x[0-9a-fA-F]+|\d+)", text, re.M)}


def layout(t: type) -> list[tuple[str, int, int]]:
    """(name, offset, size) per field; a scalar is one unnamed field."""
    if not issubclass(t, ct.Structure):
        return [("", 0, ct.sizeof(t))]
    return [(name, getattr(t, name).offset, getattr(t, name).size) for name, *_ in t._fields_]


def test_constants_match_header() -> None:
    defines = c_defines(abi.ABI_HEADER.read_text()) | c_defines(abi.PROGRAM_SOURCE.read_text())
    for name, value in defines.items():
        assert hasattr(abi, name), f"{name} is #defined in C but missing from abi.py"
        assert getattr(abi, name) == value, f"{name}: C says {value}, abi.py {getattr(abi, name)}"


@pytest.fixture(scope="module")
def dataplane():
    from xdpfw.proxy.loader import SockProxyDataplane

    dp = SockProxyDataplane(max_sockets=64, max_services=8)
    yield dp
    dp.close()


@pytest.mark.bpf
@pytest.mark.parametrize("map_name", sorted(abi.MAPS))
def test_mirror_matches_bcc_types(dataplane, map_name: str) -> None:
    table = dataplane.bpf[map_name.encode()]
    key_t, value_t = abi.MAPS[map_name]
    # Per-CPU tables expose Leaf as an array over CPUs; sLeaf is the declared value type.
    leaf = getattr(table, "sLeaf", table.Leaf)
    for what, mine, bccs in (("key", key_t, table.Key), ("value", value_t, leaf)):
        assert ct.sizeof(mine) == ct.sizeof(bccs), (
            f"{map_name} {what}: sizeof abi.py {ct.sizeof(mine)} != C {ct.sizeof(bccs)}")
        assert layout(mine) == layout(bccs), (
            f"{map_name} {what} layout differs:\n abi.py {layout(mine)}\n C      {layout(bccs)}")


@pytest.mark.bpf
def test_kernel_refusing_a_map_is_a_typed_error() -> None:
    from xdpfw.proxy.loader import MapCreateError, SockProxyDataplane

    # 2^31 sockhash buckets exceed the kernel's limit: a real refusal, not a simulated one.
    with pytest.raises(MapCreateError) as info:
        SockProxyDataplane(max_sockets=2**31)
    assert info.value.errno == errno.E2BIG, f"errno {info.value.errno}, message: {info.value}"


@pytest.mark.bpf
def test_program_the_verifier_refuses_raises_verifier_error_with_log() -> None:
    from xdpfw.proxy.loader import SockProxyDataplane, VerifierError

    broken = Path(__file__).parent / "data" / "sockproxy_unchecked_lookup.c"
    with pytest.raises(VerifierError) as info:
        SockProxyDataplane(max_sockets=64, max_services=8, source=broken)
    err = info.value
    assert "sp_verdict" in str(err), f"message does not name the program: {err}"
    # The kernel's own words for a NULL-unchecked map value, not a message made up here.
    assert "map_value_or_null" in err.log, f"verifier log lacks the reason:\n{err.log}"
    assert err.errno == errno.EACCES, f"errno {err.errno}, message: {err}"
