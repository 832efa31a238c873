"""The bypasses of issue 9, under BPF_PROG_TEST_RUN: each named shape from a blocked source
is dropped, with the reason README "How a packet is read" gives, and the same shape from an
unblocked source passes where the semantics allow it.

These failed on the parser before it read the chain in the README's four steps (a 6-header
chain fell to unparsed_policy = pass, tiny fragments were read as whole headers).
"""

from __future__ import annotations

import struct

import pytest

from tests import packets as P
from tests.test_program import DROP, PASS, add, set_policy
from xdpfw.dataplane import abi

pytestmark = pytest.mark.bpf

V6_BLOCKED, V6_OTHER = "fd00:208::1", "fd00:209::1"


def reason_of(fw, run, pkt: bytes) -> tuple[str, str]:
    """(verdict, reason the program counted) for one packet."""
    before = fw.maps.reason_totals()
    verdict = run(pkt).verdict
    after = fw.maps.reason_totals()
    moved = [r for r in after if after[r][0] != before[r][0]]
    assert len(moved) == 1, f"one packet moved {moved}"
    return verdict, moved[0]


def check_reasons(fw, run, cases) -> None:
    failures = []
    for desc, pkt, want in cases:
        got = reason_of(fw, run, pkt)
        if got != want:
            failures.append(f"{desc}: expected {want}, got {got}\n  {pkt.hex()}")
    assert not failures, "\n".join(failures)


def dstopts_chain(n: int, last: int) -> bytes:
    """n Destination Options headers, the last one followed by `last`."""
    return b"".join(P.ext(P.DSTOPTS if i < n - 1 else last, P.DSTOPTS) for i in range(n))


def udp6_behind(src: str, n: int) -> bytes:
    first = P.DSTOPTS if n else P.UDP
    return P.eth(P.ETH_IPV6, P.ipv6(src, "2001:db8::1", first,
                                    dstopts_chain(n, P.UDP) + P.l4(P.UDP, 53)))


@pytest.mark.parametrize("n", [0, 5, 6, 7, 8, 12, 16])
def test_extension_header_chains_do_not_hide_a_source_rule(fw, run, n):
    add(fw, "fd00:208::/64", "drop")
    check_reasons(fw, run, [
        (f"{n} dstopts from the blocked /64", udp6_behind(V6_BLOCKED, n),
         (DROP, "rule_drop")),
        (f"{n} dstopts from another source", udp6_behind(V6_OTHER, n),
         (PASS, "policy_pass")),
    ])


@pytest.mark.parametrize("n", [17, 20])
def test_a_chain_past_the_walk_gets_the_strictest_verdict(fw, run, n):
    add(fw, "fd00:208::/64", "drop")
    add(fw, "fd00:209::/64", "drop", "tcp", 22)
    add(fw, "fd00:20a::/64", "pass", "udp", 53)
    check_reasons(fw, run, [
        ("blocked source", udp6_behind(V6_BLOCKED, n), (DROP, "unparsed_drop")),
        # Its readable packets differ by port: the strictest of them is a drop.
        ("source with a tcp/22 drop rule", udp6_behind(V6_OTHER, n), (DROP, "unparsed_drop")),
        ("source whose only rule passes", udp6_behind("fd00:20a::1", n),
         (PASS, "unparsed_pass")),
        ("source no rule covers", udp6_behind("fd00:20b::1", n), (PASS, "unparsed_pass")),
    ])
    set_policy(fw, policy=abi.POLICY_DROP)
    check_reasons(fw, run, [
        # A pass rule that covers only udp/53 cannot vouch for a packet it cannot read.
        ("pass rule for udp/53 only, drop policy", udp6_behind("fd00:20a::1", n),
         (DROP, "unparsed_drop")),
    ])


def frag4(src: str, l4_bytes: bytes, offset8: int, more: bool, proto: int = P.TCP) -> bytes:
    ip = P.ipv4(src, "192.0.2.1", proto, l4_bytes, frag=(0x2000 if more else 0) | offset8)
    return P.eth(P.ETH_IP, ip)


def test_rfc1858_tiny_and_overlapping_ipv4_fragments(fw, run):
    add(fw, "10.208.0.0/24", "drop", "tcp", 22)
    syn = P.l4(P.TCP, 22)  # 20 bytes
    for src in ("10.208.0.5", "10.99.0.5"):  # blocked and not: RFC 1858 drops both
        check_reasons(fw, run, [
            ("8 bytes of TCP in a first fragment", frag4(src, syn[:8], 0, True),
             (DROP, "frag_tiny")),
            ("16 bytes of TCP in a first fragment", frag4(src, syn[:16], 0, True),
             (DROP, "frag_tiny")),
            ("the rest at offset 8 bytes", frag4(src, syn[8:], 1, False),
             (DROP, "frag_overlap")),
            ("4 bytes of UDP in a first fragment", frag4(src, b"\0" * 4, 0, True, P.UDP),
             (DROP, "frag_tiny")),
        ])
    check_reasons(fw, run, [
        ("a whole TCP header in the first fragment", frag4("10.208.0.5", syn, 0, True),
         (DROP, "rule_drop")),
        ("same from an unblocked source", frag4("10.99.0.5", syn, 0, True),
         (PASS, "policy_pass")),
        ("the rest at offset 16 bytes: no ports, the port rule cannot match",
         frag4("10.208.0.5", syn[16:] + b"\0" * 4, 2, False), (PASS, "policy_pass")),
    ])


def frag6(src: str, chain_after: bytes, offset8: int, more: bool, first: int) -> bytes:
    fh = struct.pack("!BBHI", first, 0, (offset8 << 3) | int(more), 0x208)
    return P.eth(P.ETH_IPV6, P.ipv6(src, "2001:db8::1", P.FRAGMENT, fh + chain_after))


def test_rfc7112_ipv6_first_fragment_must_hold_the_whole_chain(fw, run):
    add(fw, "fd00:208:1::/64", "drop", "tcp", 22)
    src = "fd00:208:1::5"
    syn = P.l4(P.TCP, 22)
    opts = P.ext(P.TCP, P.DSTOPTS)
    check_reasons(fw, run, [
        ("chain stops before TCP", frag6(src, P.ext(P.TCP, P.DSTOPTS)[:6], 0, True, P.DSTOPTS),
         (DROP, "frag_chain")),
        ("a dstopts header, and TCP in the next fragment", frag6(src, opts, 0, True, P.DSTOPTS),
         (DROP, "frag_chain")),
        ("8 bytes of TCP", frag6(src, syn[:8], 0, True, P.TCP), (DROP, "frag_chain")),
        ("the whole chain and TCP header", frag6(src, opts + syn, 0, True, P.DSTOPTS),
         (DROP, "rule_drop")),
        ("atomic fragment: a plain packet", frag6(src, syn, 0, False, P.TCP),
         (DROP, "rule_drop")),
        ("atomic fragment from another source", frag6("fd00:9::5", syn, 0, False, P.TCP),
         (PASS, "policy_pass")),
        ("a truncated atomic fragment is incomplete, not frag_chain",
         frag6(src, syn[:8], 0, False, P.TCP), (DROP, "unparsed_drop")),
        ("non-first fragment: no ports", frag6(src, syn, 10, False, P.TCP),
         (PASS, "policy_pass")),
    ])


def test_non_first_ipv6_fragments_are_never_read_as_headers(fw, run):
    add(fw, "fd00:208:2::/64", "drop", "udp")
    src = "fd00:208:2::5"
    # A later fragment whose payload looks like a TCP header: it must match by the Fragment
    # header's next header (UDP) and nothing in the payload.
    tail = frag6(src, P.l4(P.TCP, 22), 40, True, P.UDP)
    looks_like_ext = frag6(src, P.ext(P.TCP, P.DSTOPTS) + P.l4(P.TCP, 80), 40, False, P.UDP)
    check_reasons(fw, run, [
        ("later fragment of a UDP datagram", tail, (DROP, "rule_drop")),
        ("later fragment whose payload looks like headers", looks_like_ext,
         (DROP, "rule_drop")),
        ("later fragment that names TCP", frag6(src, b"\0" * 24, 40, False, P.TCP),
         (PASS, "policy_pass")),
    ])


def test_a_truncated_extension_header_is_incomplete_whatever_follows(fw, run):
    add(fw, "fd00:208:3::/64", "pass")
    src = "fd00:208:3::5"
    # hdrlen 4 (40 bytes) announced, 8 present; the next header is GRE (47).
    short = P.eth(P.ETH_IPV6, P.ipv6(src, "2001:db8::1", P.DSTOPTS,
                                     bytes([47, 4]) + b"\x01\x04\0\0\0\0"))
    check_reasons(fw, run, [("truncated, pass rule", short, (PASS, "unparsed_pass"))])
    set_policy(fw, unparsed=abi.POLICY_DROP)
    check_reasons(fw, run, [("truncated, unparsed_policy drop: the pass rule cannot rescue it",
                             short, (DROP, "unparsed_drop"))])


def test_icmp_needs_no_header_bytes(fw, run):
    add(fw, "10.208.4.0/24", "drop", "icmp")
    stub = P.eth(P.ETH_IP, P.ipv4("10.208.4.1", "192.0.2.1", P.ICMP, b"\x08\x00"))
    empty6 = P.eth(P.ETH_IPV6, P.ipv6("fd00:208:4::1", "2001:db8::1", P.ICMPV6, b""))
    check_reasons(fw, run, [
        ("2 bytes of ICMP from an icmp-blocked /24", stub, (DROP, "rule_drop")),
        ("empty ICMPv6 from an unblocked source", empty6, (PASS, "policy_pass")),
    ])


def test_ethernet_padding_is_never_read_as_a_header(fw, run):
    add(fw, "10.208.5.0/24", "drop", "tcp", 22)
    add(fw, "10.208.6.0/24", "pass", "tcp", 80)
    syn80 = P.l4(P.TCP, 80)
    # IPv4 total length covers 10 bytes of TCP; the frame carries the rest as "padding".
    hdr = bytearray(P.ipv4("10.208.6.1", "192.0.2.1", P.TCP, syn80))
    hdr[2:4] = struct.pack("!H", 30)
    padded = P.eth(P.ETH_IP, bytes(hdr))
    set_policy(fw, policy=abi.POLICY_DROP)
    check_reasons(fw, run, [
        ("TCP header only in the padding: incomplete, strictest is the drop policy",
         padded, (DROP, "unparsed_drop")),
        ("the same packet with its real length", P.eth(P.ETH_IP, P.ipv4(
            "10.208.6.1", "192.0.2.1", P.TCP, syn80)), (PASS, "rule_pass")),
    ])


def test_ipv4_length_fields_are_checked(fw, run):
    add(fw, "10.208.7.0/24", "drop")
    good = bytearray(P.ipv4("10.208.7.1", "192.0.2.1", P.UDP, P.l4(P.UDP, 53)))
    long = bytearray(good)
    long[2:4] = struct.pack("!H", 400)  # more than the frame holds
    short = bytearray(good)
    short[2:4] = struct.pack("!H", 16)  # less than the header
    ihl4 = bytearray(good)
    ihl4[0] = 0x44
    check_reasons(fw, run, [
        (desc, P.eth(P.ETH_IP, bytes(pkt)), (DROP, reason))
        for desc, pkt, reason in [
            ("well-formed", good, "rule_drop"),
            ("total length past the frame", long, "unparsed_drop"),
            ("total length below the header", short, "unparsed_drop"),
            ("ihl 4", ihl4, "unparsed_drop"),
        ]
    ])


def test_nd_exemption_needs_an_unfragmented_icmpv6_type(fw, run):
    set_policy(fw, policy=abi.POLICY_DROP)
    ns = struct.pack("!BBHI", 135, 0, 0, 0) + b"\0" * 16
    plain = P.eth(P.ETH_IPV6, P.ipv6("fe80::1", "ff02::1", P.ICMPV6, ns))
    atomic = frag6("fe80::1", ns, 0, False, P.ICMPV6)
    check_reasons(fw, run, [
        ("neighbour solicitation", plain, (PASS, "l2_exempt_pass")),
        ("the same in an atomic fragment", atomic, (DROP, "policy_drop")),
    ])
