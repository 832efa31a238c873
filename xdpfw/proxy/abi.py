"""ctypes mirror of xdpfw/bpf/sockproxy_abi.h: the one Python copy of the shared structs.

tests/test_sockproxy_abi.py compares these with the Key/Leaf types BCC derives from the
header (sizes, field names and offsets) and the constants with the header's #defines.
"""

from __future__ import annotations

import ctypes as ct
from pathlib import Path

BPF_DIR = Path(__file__).resolve().parent.parent / "bpf"
ABI_HEADER = BPF_DIR / "sockproxy_abi.h"
PROGRAM_SOURCE = BPF_DIR / "sockproxy.c"

SP_DIR_TO_BACKEND = 0
SP_DIR_TO_CLIENT = 1
SP_MAX_SOCKETS = 65536
SP_MAX_SERVICES = 1024
SP_SERVICE_UNKNOWN = 0xFFFFFFFF  # defined in sockproxy.c: sp_traffic key for "no peer" skbs


class SpPeer(ct.Structure):
    _fields_ = (
        ("peer_cookie", ct.c_uint64),
        ("service_id", ct.c_uint32),
        ("direction", ct.c_uint32),
    )


class SpTraffic(ct.Structure):
    _fields_ = (
        ("bytes_to_backend", ct.c_uint64),
        ("bytes_to_client", ct.c_uint64),
        ("skbs_to_backend", ct.c_uint64),
        ("skbs_to_client", ct.c_uint64),
        ("no_peer", ct.c_uint64),
        ("redirect_failed", ct.c_uint64),
        ("empty_skbs", ct.c_uint64),
    )


class SpConns(ct.Structure):
    _fields_ = (
        ("accepted", ct.c_uint64),
        ("active", ct.c_uint64),
        ("closed", ct.c_uint64),
        ("backend_failures", ct.c_uint64),
        ("relayed_in_userspace", ct.c_uint64),
        ("queue_resets", ct.c_uint64),
        ("limit_waits", ct.c_uint64),
        ("idle_resets", ct.c_uint64),
        ("client_refusals", ct.c_uint64),
    )


# Map name -> (key type, value type) as the C file declares them.
MAPS: dict[str, tuple[type, type]] = {
    "sp_peers": (ct.c_uint64, SpPeer),
    "sp_traffic": (ct.c_uint32, SpTraffic),
    "sp_conns": (ct.c_uint32, SpConns),
}
