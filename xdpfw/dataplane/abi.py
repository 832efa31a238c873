"""ctypes mirror of xdpfw/bpf/xdpfw_abi.h: the one Python copy, checked by tests/test_abi.py."""

from __future__ import annotations

import ctypes
import struct
from pathlib import Path

ABI_HEADER = Path(__file__).resolve().parent.parent / "bpf" / "xdpfw_abi.h"

ACT_NONE = 0
ACT_PASS = 1
ACT_DROP = 2

POLICY_PASS = 0
POLICY_DROP = 1

IFF_GUARD_L2 = 0x1

REASON_RULE_PASS = 0
REASON_RULE_DROP = 1
REASON_POLICY_PASS = 2
REASON_POLICY_DROP = 3
REASON_UNPARSED_PASS = 4
REASON_UNPARSED_DROP = 5
REASON_L2_EXEMPT = 6
REASON_FRAG_OVERLAP = 7
REASON_FRAG_TINY = 8
REASON_FRAG_CHAIN = 9
REASON_LB_TX = 10
REASON_LB_REDIRECT = 11
REASON_LB_CPU = 12
REASON_LB_NO_BACKEND = 13
REASON_LB_NO_EGRESS = 14
REASON_MAX = 15
REASON_NAMES = {
    REASON_RULE_PASS: "rule_pass",
    REASON_RULE_DROP: "rule_drop",
    REASON_POLICY_PASS: "policy_pass",
    REASON_POLICY_DROP: "policy_drop",
    REASON_UNPARSED_PASS: "unparsed_pass",
    REASON_UNPARSED_DROP: "unparsed_drop",
    REASON_L2_EXEMPT: "l2_exempt_pass",
    REASON_FRAG_OVERLAP: "frag_overlap",
    REASON_FRAG_TINY: "frag_tiny",
    REASON_FRAG_CHAIN: "frag_chain",
    REASON_LB_TX: "lb_tx",
    REASON_LB_REDIRECT: "lb_redirect",
    REASON_LB_CPU: "lb_cpu",
    REASON_LB_NO_BACKEND: "lb_no_backend",
    REASON_LB_NO_EGRESS: "lb_no_egress",
}
# The XDP action behind each reason (metrics label them so; nothing forwarded is a "pass").
REASON_VERDICTS = {
    REASON_RULE_PASS: "pass", REASON_RULE_DROP: "drop", REASON_POLICY_PASS: "pass",
    REASON_POLICY_DROP: "drop", REASON_UNPARSED_PASS: "pass", REASON_UNPARSED_DROP: "drop",
    REASON_L2_EXEMPT: "pass", REASON_FRAG_OVERLAP: "drop", REASON_FRAG_TINY: "drop",
    REASON_FRAG_CHAIN: "drop", REASON_LB_TX: "tx", REASON_LB_REDIRECT: "redirect",
    REASON_LB_CPU: "redirect", REASON_LB_NO_BACKEND: "drop", REASON_LB_NO_EGRESS: "drop",
}

IFACE_PASSED = 0
IFACE_DROPPED = 1
IFACE_FORWARDED = 2
IFACE_COUNTERS = 3
SLOT_MARKER = 0x5107C0DE
EXPLAIN_MAGIC = 0x78706C6E

NO_RULE = 0xFFFFFFFF
NO_PORT_SET = 0
PORT_MATCH = 0
PORT_STRICT = 1

SKIP_HOSTS_V6 = 0x4
SKIP_RULES_V6 = 0x8

# IPv4 DIR-24-8 and packed verdicts (xdpfw_abi.h: XDPFW_V4_*, XDPFW_PV_*).
PV_SLOT_MASK = 0xFFFFFF
PV_SET_SHIFT = 24
PV_SET_MASK = 0xFFFFFF
PV_ACT_SHIFT = 48
V4_ID_BITS = 23
V4_ID_MASK = 0x7FFFFF
V4_AUX_SHIFT = 23
V4_NET_SHIFT = 46
V4_LEN_SHIFT = 54
V4_KIND_SHIFT = 62
V4_PLAIN = 0
V4_ONE = 1
V4_GROUP = 2
V4_TBL24 = 16777216
HOSTLESS_V6_BITS = 24
HOSTLESS_V6_WORDS = 262144
V6_BUCKET_MUL = 0x9E3779B97F4A7C15


class LpmV6Key(ctypes.Structure):
    _fields_ = (("prefixlen", ctypes.c_uint32), ("addr", ctypes.c_uint8 * 16))


class HostV6Key(ctypes.Structure):
    _fields_ = (("addr", ctypes.c_uint8 * 16),)


class PrefixVerdict(ctypes.Structure):
    _fields_ = (
        ("rule_slot", ctypes.c_uint32),
        ("port_set", ctypes.c_uint32),
        ("action", ctypes.c_uint8),
        ("pad", ctypes.c_uint8 * 3),
    )


class PortKey(ctypes.Structure):
    _fields_ = (
        ("port_set", ctypes.c_uint32),
        ("proto", ctypes.c_uint8),
        ("kind", ctypes.c_uint8),
        ("dport", ctypes.c_uint16),  # network order
    )


class PortVerdict(ctypes.Structure):
    _fields_ = (
        ("rule_slot", ctypes.c_uint32),
        ("action", ctypes.c_uint8),
        ("pad", ctypes.c_uint8 * 3),
    )


class IfacePolicy(ctypes.Structure):
    _fields_ = (
        ("policy", ctypes.c_uint8),
        ("unparsed_policy", ctypes.c_uint8),
        ("flags", ctypes.c_uint8),
        ("pad", ctypes.c_uint8),
    )


class Counter(ctypes.Structure):
    _fields_ = (("packets", ctypes.c_uint64), ("bytes", ctypes.c_uint64))


# -- load balancer ----------------------------------------------------------------------

LB_FWD_TX = 0
LB_FWD_REDIRECT = 1
LB_NO_BACKEND = 0xFFFFFFFF
LB_MAX_STEER_CPUS = 8
LB_BE_LIVE = 0x1
LB_SVC_FORWARDED = 0
LB_SVC_NO_BACKEND = 1
LB_SVC_COUNTERS = 2
LB_VIP_INDEX_BITS = 12
LB_VIP_INDEX = 1 << LB_VIP_INDEX_BITS
LB_VIP_COLLIDE = 0xFFFFFFFF
LB_FLOW_CACHE = 4096


class LbVip(ctypes.Structure):
    _fields_ = (
        ("addr", ctypes.c_uint8 * 16),  # network order
        ("port", ctypes.c_uint16),  # network order
        ("proto", ctypes.c_uint8),
        ("family", ctypes.c_uint8),
    )


class LbSteer(ctypes.Structure):
    _fields_ = (("count", ctypes.c_uint32), ("cpus", ctypes.c_uint32 * LB_MAX_STEER_CPUS))


class LbService(ctypes.Structure):
    _fields_ = (
        ("slot", ctypes.c_uint32),
        ("fwd", ctypes.c_uint8),
        ("pad", ctypes.c_uint8 * 3),
        ("steer", LbSteer),
    )


class LbConfig(ctypes.Structure):
    _fields_ = (("services", ctypes.c_uint32), ("steer", LbSteer))


class LbBackend(ctypes.Structure):
    _fields_ = (
        ("dmac", ctypes.c_uint8 * 6),
        ("smac", ctypes.c_uint8 * 6),
        ("tx_port", ctypes.c_uint32),
        ("gen", ctypes.c_uint32),
        ("flags", ctypes.c_uint8),
        ("pad", ctypes.c_uint8 * 3),
    )


class LbFlow(ctypes.Structure):
    _fields_ = (
        ("saddr", ctypes.c_uint8 * 16),  # network order
        ("daddr", ctypes.c_uint8 * 16),  # network order
        ("sport", ctypes.c_uint16),  # network order
        ("dport", ctypes.c_uint16),  # network order
        ("proto", ctypes.c_uint8),
        ("family", ctypes.c_uint8),
        ("pad", ctypes.c_uint8 * 2),
    )


class LbCt(ctypes.Structure):
    _fields_ = (
        ("backend", ctypes.c_uint32),
        ("gen", ctypes.c_uint32),
        ("last_seen", ctypes.c_uint64),
    )


class LbServiceSlot(ctypes.Structure):
    _fields_ = (("vip", LbVip), ("svc", LbService))


class LbFlowSlot(ctypes.Structure):
    _fields_ = (("flow", LbFlow), ("ct", LbCt))


def lb_vip_bucket(key: bytes) -> int:
    """xdpfw_lb_vip_bucket() of lb.h, for a packed struct lb_vip."""
    x = 0
    for (w,) in struct.iter_unpack("<I", key):
        x ^= w
    return ((x * 0x9E3779B1) & 0xFFFFFFFF) >> (32 - LB_VIP_INDEX_BITS)


class FwCfg(ctypes.Structure):
    _fields_ = (
        ("sample_rate", ctypes.c_uint32),
        ("skip", ctypes.c_uint32),
        ("capture", ctypes.c_uint32),  # non-zero while a capture runs
        ("pad", ctypes.c_uint32),
    )


# -- packet capture (xdpfw_abi.h: XDPFW_CAPTURE_*) ----------------------------------------

CAPTURE_MAX_SNAPLEN = 2048
CAPTURE_ANY = 0xFFFFFFFF
CAPTURE_CAPTURED = 0
CAPTURE_LIMITED = 1
CAPTURE_LOST = 2
CAPTURE_COUNTERS = 3


class CaptureCfg(ctypes.Structure):
    _fields_ = (
        ("iface", ctypes.c_uint32),
        ("rule_slot", ctypes.c_uint32),
        ("reasons", ctypes.c_uint32),  # bit per REASON_*
        ("verdicts", ctypes.c_uint32),  # bit per XDP action
        ("snaplen", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
        ("interval_ns", ctypes.c_uint64),
        ("burst_ns", ctypes.c_uint64),
    )


class CaptureBucket(ctypes.Structure):
    _fields_ = (("tat", ctypes.c_uint64),)


class CaptureRecord(ctypes.Structure):
    """A captured frame from capture_ring: this header, then cap_len bytes of data."""

    _fields_ = (
        ("ts_ns", ctypes.c_uint64),
        ("pkt_len", ctypes.c_uint32),
        ("cap_len", ctypes.c_uint32),
        ("iface", ctypes.c_uint32),
        ("rule_slot", ctypes.c_uint32),
        ("reason", ctypes.c_uint8),
        ("verdict", ctypes.c_uint8),
        ("pad", ctypes.c_uint8 * 6),
        ("data", ctypes.c_uint8 * CAPTURE_MAX_SNAPLEN),
    )


CAPTURE_HEADER = CaptureRecord.data.offset  # bytes before a record's frame


class ExplainResult(ctypes.Structure):
    """An explain instance's decision, over the first bytes of the frame it ran on."""

    _fields_ = (
        ("magic", ctypes.c_uint32),
        ("reason", ctypes.c_uint32),
        ("rule_slot", ctypes.c_uint32),
        ("verdict", ctypes.c_uint32),
    )


class DropEvent(ctypes.Structure):
    """A sampled drop from the drop_events ring buffer."""

    _fields_ = (
        ("saddr", ctypes.c_uint8 * 16),  # network order
        ("daddr", ctypes.c_uint8 * 16),
        ("rule_slot", ctypes.c_uint32),
        ("iface", ctypes.c_uint32),  # interface slot
        ("pkt_len", ctypes.c_uint32),
        ("sport", ctypes.c_uint16),  # network order
        ("dport", ctypes.c_uint16),  # network order
        ("eth_proto", ctypes.c_uint16),  # network order
        ("l4_proto", ctypes.c_uint8),
        ("reason", ctypes.c_uint8),
    )


# Which ctypes mirror is the key/value of which map (checked against BCC in tests/test_abi.py).
STATE_DIR_LEN = 248


class V4Group(ctypes.Structure):
    _fields_ = (("vid", ctypes.c_uint32 * 256),)



class PinIdentity(ctypes.Structure):
    _fields_ = (
        ("store_id", ctypes.c_uint64),
        ("state_dir", ctypes.c_uint8 * STATE_DIR_LEN),
        ("generation", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
    )


MAP_TYPES: dict[str, tuple[type, type]] = {
    "rules_v6": (LpmV6Key, PrefixVerdict),
    "hosts_v6": (HostV6Key, PrefixVerdict),
    "port_rules": (PortKey, PortVerdict),
    "iface_policy": (ctypes.c_uint32, IfacePolicy),
    "chain_progs": (ctypes.c_uint32, ctypes.c_uint32),
    "rule_counters": (ctypes.c_uint32, Counter),
    "reason_counters": (ctypes.c_uint32, Counter),
    "iface_counters": (ctypes.c_uint32, Counter),
    "fw_config": (ctypes.c_uint32, FwCfg),
    "hostless_v6": (ctypes.c_uint32, ctypes.c_uint64),
    "v4_tbl24": (ctypes.c_uint32, ctypes.c_uint64),
    "v4_tbl8": (ctypes.c_uint32, V4Group),
    "v4_verdicts": (ctypes.c_uint32, ctypes.c_uint64),
    "lb_config": (ctypes.c_uint32, LbConfig),
    "lb_services": (LbVip, LbService),
    "lb_tables": (ctypes.c_uint32, ctypes.c_uint32),
    "lb_backends": (ctypes.c_uint32, LbBackend),
    "lb_conntrack": (LbFlow, LbCt),
    "lb_vip_index": (ctypes.c_uint32, ctypes.c_uint32),
    "lb_service_slots": (ctypes.c_uint32, LbServiceSlot),
    "lb_flow_cache": (ctypes.c_uint32, LbFlowSlot),
    "tx_ports": (ctypes.c_uint32, ctypes.c_int32),
    "cpu_map": (ctypes.c_uint32, ctypes.c_int32),
    "lb_service_counters": (ctypes.c_uint32, Counter),
    "lb_backend_counters": (ctypes.c_uint32, Counter),
    "pin_identity": (ctypes.c_uint32, PinIdentity),
    "capture_config": (ctypes.c_uint32, CaptureCfg),
    "capture_counters": (ctypes.c_uint32, Counter),
    "capture_bucket": (ctypes.c_uint32, CaptureBucket),
    "capture_scratch": (ctypes.c_uint32, CaptureRecord),
}
