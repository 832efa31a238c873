"""Pins the packet model (tests/packet_model.py) to the README, case by case, without BPF.

The differential test trusts the model; these cases are what a reviewer checks the model
against, each a sentence of the README's "How a packet is read" section.
"""

from __future__ import annotations

import ipaddress

import pytest

from tests import packet_model as M
from tests.packet_gen import eth, ext, icmp, ipv4, ipv6, tcp, udp
from tests.packet_model import DROP, PASS, Iface, Model, Rule

V6_DROPPED = ipaddress.IPv6Address("2001:db8:bad:1::5").packed
V6_FREE = ipaddress.IPv6Address("2001:db8:600d::5").packed
V4_NET = ipaddress.IPv4Address("10.208.0.5").packed
LINK_LOCAL = ipaddress.IPv6Address("fe80::1").packed

DROP_64 = [Rule("2001:db8:bad:1::/64", "drop")]
DROP_TCP22 = [Rule("10.208.0.0/24", "drop", "tcp", 22),
              Rule("2001:db8:bad:1::/64", "drop", "tcp", 22)]


def v4(payload: bytes, proto: int = M.TCP, src: bytes = V4_NET, **kw) -> bytes:
    return eth(M.ETH_IP, ipv4(src, proto, payload, **kw))


def v6(chain: list[int], transport: bytes, final: int = M.TCP, src: bytes = V6_DROPPED,
       frag: tuple[int, bool] = (0, False)) -> bytes:
    """IPv6 with extension headers of the given kinds, in order, then `transport`."""
    kinds = [*chain, final]
    body = b"".join(
        ext(k, kinds[i + 1], frag_offset=frag[0], more=frag[1]) for i, k in enumerate(chain)
    )
    return eth(M.ETH_IPV6, ipv6(src, kinds[0], body + transport))


def nd(icmp_type: int, src: bytes = LINK_LOCAL, chain: tuple[int, ...] = (),
       frag: tuple[int, bool] = (0, False), size: int = 8) -> bytes:
    return v6(list(chain), icmp(icmp_type, size), M.ICMPV6, src, frag)


def short_ip(frame: bytes, ip_off: int, total: int) -> bytes:
    """The same bytes, with IPv4 total length `total`: the rest becomes Ethernet padding."""
    return frame[: ip_off + 2] + total.to_bytes(2, "big") + frame[ip_off + 4 :]


CASES = [
    # (description, rules, iface, frame, expected)
    *[(f"{n} Destination Options from a dropped /64", DROP_64, Iface(),
       v6([M.DSTOPTS] * n, tcp(80)), (DROP, "rule_drop")) for n in (6, 7, 8)],
    ("16 extension headers are walked", DROP_64, Iface(),
     v6([M.DSTOPTS] * 16, tcp(80)), (DROP, "rule_drop")),
    ("a 17th is incomplete: strictest of a dropped source", DROP_64, Iface(),
     v6([M.DSTOPTS] * 17, tcp(80)), (DROP, "unparsed_drop")),
    ("a 17th is incomplete: strictest of a free source", DROP_64, Iface(),
     v6([M.DSTOPTS] * 17, tcp(80), src=V6_FREE), (PASS, "unparsed_pass")),
    ("a 17th from a source with drop tcp 22: strictest is drop", DROP_TCP22, Iface(),
     v6([M.DSTOPTS] * 17, udp(53)), (DROP, "unparsed_drop")),
    ("IPv4 first fragment with 8 bytes of TCP", [Rule("10.208.0.0/24", "pass")], Iface(),
     v4(tcp(22)[:8], frag=0x2000), (DROP, "frag_tiny")),
    ("IPv4 first fragment with 7 bytes of UDP", [], Iface(),
     v4(udp(53)[:7], M.UDP, frag=0x2000), (DROP, "frag_tiny")),
    ("IPv4 first fragment with 8 bytes of UDP is read", DROP_TCP22, Iface(),
     v4(udp(22), M.UDP, frag=0x2000), (PASS, "policy_pass")),
    ("IPv4 first fragment, 20 bytes of TCP with doff 6: incomplete, not tiny", DROP_TCP22,
     Iface(), v4(tcp(80)[:12] + b"\x60" + tcp(80)[13:], frag=0x2000), (DROP, "unparsed_drop")),
    ("IPv4 last fragment with 8 bytes of TCP is not a first fragment", [], Iface(),
     v4(tcp(22)[:8], frag=0), (PASS, "unparsed_pass")),
    ("offset-1 fragment, whatever the protocol", [Rule("10.208.0.0/24", "pass")], Iface(),
     v4(icmp(8), M.ICMP, frag=1), (DROP, "frag_overlap")),
    ("offset-1 fragment, MF clear", [], Iface(), v4(tcp(22), frag=1), (DROP, "frag_overlap")),
    ("IPv4 non-first fragment: the port rule cannot match", DROP_TCP22, Iface(),
     v4(tcp(22), frag=0x2000 | 2), (PASS, "policy_pass")),
    ("IPv4 non-first fragment: a protocol rule can", [Rule("10.208.0.0/24", "drop", "tcp")],
     Iface(), v4(b"", frag=100), (DROP, "rule_drop")),
    ("IPv6 first fragment whose chain stops before TCP", [], Iface(),
     v6([M.FRAGMENT], tcp(22)[:10], frag=(0, True)), (DROP, "frag_chain")),
    ("IPv6 first fragment with a cut Destination Options header after it", [], Iface(),
     eth(M.ETH_IPV6, ipv6(V6_FREE, M.FRAGMENT, ext(M.FRAGMENT, M.DSTOPTS, more=True)
                          + ext(M.DSTOPTS, M.TCP, hdrlen=3)[:16])), (DROP, "frag_chain")),
    ("IPv6 atomic fragment whose TCP is cut: incomplete", [], Iface(),
     v6([M.FRAGMENT], tcp(22)[:10], frag=(0, False)), (PASS, "unparsed_pass")),
    ("IPv6 non-first fragment, drop tcp 22: not dropped by the port rule", DROP_TCP22, Iface(),
     v6([M.FRAGMENT], tcp(22), frag=(100, True)), (PASS, "policy_pass")),
    ("IPv6 non-first fragment: protocol from the Fragment header, even with no TCP bytes",
     [Rule("2001:db8:bad:1::/64", "drop", "tcp")], Iface(),
     v6([M.FRAGMENT], b"", frag=(5, False)), (DROP, "rule_drop")),
    ("IPv6 first fragment with TCP 22 from drop tcp 22", DROP_TCP22, Iface(),
     v6([M.FRAGMENT], tcp(22), frag=(0, True)), (DROP, "rule_drop")),
    ("ICMP with 2 bytes is complete", [Rule("10.208.0.0/24", "drop", "icmp")], Iface(),
     v4(icmp(8, 2), M.ICMP), (DROP, "rule_drop")),
    ("ICMP with 0 bytes is complete", [Rule("10.208.0.0/24", "pass", "icmp")],
     Iface(policy="drop"), v4(b"", M.ICMP), (PASS, "rule_pass")),
    ("icmp on an IPv6 prefix means ICMPv6", [Rule("2001:db8:bad:1::/64", "drop", "icmp")],
     Iface(), v6([], icmp(128), M.ICMPV6), (DROP, "rule_drop")),
    ("icmp on an IPv6 prefix does not match protocol 1",
     [Rule("2001:db8:bad:1::/64", "drop", "icmp")], Iface(), v6([], icmp(8), M.ICMP),
     (PASS, "policy_pass")),
    ("ARP under a drop policy", [], Iface(policy="drop"),
     eth(M.ETH_ARP, bytes(28)), (PASS, "l2_exempt_pass")),
    ("ARP under a drop policy with guard_l2", [], Iface(policy="drop", guard_l2=True),
     eth(M.ETH_ARP, bytes(28)), (DROP, "policy_drop")),
    ("ARP under a pass policy", [], Iface(), eth(M.ETH_ARP, bytes(28)), (PASS, "policy_pass")),
    ("LLDP under a drop policy", [], Iface(policy="drop", unparsed_policy="pass"),
     eth(0x88CC, bytes(30)), (DROP, "policy_drop")),
    ("padding after a truncated TCP header does not complete it", DROP_TCP22, Iface(),
     short_ip(v4(tcp(80)), 14, 30), (DROP, "unparsed_drop")),
    ("padding after a truncated IPv6 TCP header does not complete it", [], Iface(),
     eth(M.ETH_IPV6, ipv6(V6_FREE, M.TCP, tcp(80), plen=12)), (PASS, "unparsed_pass")),
    ("README: drop tcp 22, cut transport header: dropped", DROP_TCP22, Iface(),
     v4(tcp(80)[:12]), (DROP, "unparsed_drop")),
    ("README: drop tcp 22, readable UDP: passes", DROP_TCP22, Iface(),
     v4(udp(22), M.UDP), (PASS, "policy_pass")),
    ("strictest ignores a port rule shadowed by a longer any rule",
     [Rule("10.0.0.0/8", "drop", "tcp", 22), Rule("10.208.0.0/16", "pass")], Iface(),
     v4(tcp(22)[:12]), (PASS, "unparsed_pass")),
    ("strictest of an uncovered source is the policy", [], Iface(policy="drop"),
     v4(tcp(22)[:12]), (DROP, "unparsed_drop")),
    ("incomplete under unparsed_policy drop, even from a pass source",
     [Rule("10.208.0.0/24", "pass")], Iface(unparsed_policy="drop"),
     v4(tcp(22)[:12]), (DROP, "unparsed_drop")),
    ("bad fragments drop under unparsed_policy pass and a pass rule",
     [Rule("10.208.0.0/24", "pass")], Iface(), v4(tcp(22), frag=0x2001), (DROP, "frag_overlap")),
    ("ihl 4: incomplete, not unreadable (the source is known)", DROP_64 + DROP_TCP22, Iface(),
     eth(M.ETH_IP, bytes([0x44]) + ipv4(V4_NET, M.TCP, tcp(22))[1:]), (DROP, "unparsed_drop")),
    ("total length beyond the frame: incomplete", [Rule("10.208.0.0/24", "drop")], Iface(),
     v4(tcp(80), total=100), (DROP, "unparsed_drop")),
    ("IPv4 header cut: unreadable", [Rule("10.208.0.0/24", "drop")], Iface(),
     v4(tcp(80))[:14 + 19], (PASS, "unparsed_pass")),
    ("IPv4 options before the ports", DROP_TCP22, Iface(), v4(tcp(22), ihl=15),
     (DROP, "rule_drop")),
    ("two VLAN tags (any TPIDs)", DROP_TCP22, Iface(),
     eth(M.ETH_IP, ipv4(V4_NET, M.TCP, tcp(22)), (0x8100, 0x8100)), (DROP, "rule_drop")),
    ("three VLAN tags: unreadable", DROP_TCP22, Iface(unparsed_policy="drop"),
     eth(M.ETH_IP, ipv4(V4_NET, M.TCP, tcp(80)), (0x88A8, 0x8100, 0x8100)),
     (DROP, "unparsed_drop")),
    ("IPv6 ethertype, version 4: unreadable", [], Iface(policy="drop"),
     eth(M.ETH_IPV6, ipv6(V6_FREE, M.TCP, tcp(80), version=4)), (PASS, "unparsed_pass")),
    ("AH is (hdrlen + 2) x 4 bytes", DROP_TCP22, Iface(),
     eth(M.ETH_IPV6, ipv6(V6_DROPPED, M.AH, ext(M.AH, M.HOPOPTS, hdrlen=4)
                          + ext(M.HOPOPTS, M.TCP) + tcp(22))), (DROP, "rule_drop")),
    ("ESP ends the chain: complete", [Rule("2001:db8:bad:1::/64", "drop", "udp")], Iface(),
     v6([M.DSTOPTS], b"", 50), (PASS, "policy_pass")),
    ("neighbour solicitation under a drop policy", [], Iface(policy="drop"),
     nd(135), (PASS, "l2_exempt_pass")),
    ("redirect (137) under a drop policy", [], Iface(policy="drop"),
     nd(137, chain=(M.HOPOPTS,)), (PASS, "l2_exempt_pass")),
    ("ND with only its type byte", [], Iface(policy="drop"), nd(134, size=1),
     (PASS, "l2_exempt_pass")),
    ("ICMPv6 with no type byte is not ND", [], Iface(policy="drop"), nd(135, size=0),
     (DROP, "policy_drop")),
    ("ND in an atomic fragment is not exempt", [], Iface(policy="drop"),
     nd(135, chain=(M.FRAGMENT,)), (DROP, "policy_drop")),
    ("ND as a non-first fragment is not exempt", [], Iface(policy="drop"),
     nd(135, chain=(M.FRAGMENT,), frag=(3, False)), (DROP, "policy_drop")),
    ("echo request is not ND", [], Iface(policy="drop"), nd(128), (DROP, "policy_drop")),
    ("ND with guard_l2", [], Iface(policy="drop", guard_l2=True), nd(136),
     (DROP, "policy_drop")),
    ("an explicit rule still applies to ND", [Rule("fe80::/64", "drop", "icmp")],
     Iface(policy="drop"), nd(135), (DROP, "rule_drop")),
    ("ND under a pass policy is policy_pass", [], Iface(), nd(135), (PASS, "policy_pass")),
]


@pytest.mark.parametrize(("desc", "rules", "iface", "frame", "want"), CASES,
                         ids=[c[0] for c in CASES])
def test_model_case(desc, rules, iface, frame, want):
    got = Model(rules, iface).verdict(frame)
    assert got == want, f"{desc}: {M.parse(frame)}\nframe {frame.hex()}"


@pytest.mark.parametrize(
    ("rules", "src", "proto", "dport", "want"),
    [
        # The README's examples of "longest prefix wins, then the most specific match".
        ([Rule("10.0.0.0/8", "drop"), Rule("10.1.2.0/24", "pass")], "10.1.2.7", 6, 80, "pass"),
        ([Rule("10.0.0.0/8", "drop"), Rule("10.1.0.0/16", "pass", "tcp", 80)],
         "10.1.2.3", 6, 81, "drop"),
        ([Rule("10.0.0.0/8", "drop", "tcp", 22), Rule("10.1.0.0/16", "pass")],
         "10.1.0.1", 6, 22, "pass"),
        ([Rule("192.0.2.0/24", "drop"), Rule("192.0.2.0/24", "pass", "tcp"),
          Rule("192.0.2.0/24", "drop", "tcp", 23)], "192.0.2.5", 6, 443, "pass"),
        ([Rule("192.0.2.0/24", "drop"), Rule("192.0.2.0/24", "pass", "tcp"),
          Rule("192.0.2.0/24", "drop", "tcp", 23)], "192.0.2.5", 6, 23, "drop"),
        ([Rule("10.0.0.0/8", "pass", "tcp", 22), Rule("10.1.0.0/16", "drop", "tcp")],
         "10.1.0.1", 6, 22, "drop"),
        ([Rule("10.0.0.0/8", "drop", "tcp", 22)], "10.1.0.1", 6, None, None),
    ],
)
def test_rule_semantics(rules, src, proto, dport, want):
    rule = Model(rules).match(ipaddress.ip_address(src), proto, dport)
    assert (rule.action if rule else None) == want


def test_model_knobs_flip_the_ambiguous_readings(monkeypatch):
    """The readings the README leaves open are switches (see the module's knobs)."""
    nested = v6([M.FRAGMENT, M.FRAGMENT], tcp(22), src=V6_FREE, frag=(0, True))
    nested = nested[:14 + 40 + 8 + 2] + bytes([0, 40 | 1]) + nested[14 + 40 + 8 + 4 :]
    assert Model([]).verdict(nested) == (DROP, "frag_chain")
    monkeypatch.setattr(M, "NESTED_NONFIRST_IS_FRAG_CHAIN", False)
    assert Model([]).verdict(nested) == (PASS, "policy_pass")

    shadowed = [Rule("10.0.0.0/8", "drop", "tcp", 22), Rule("10.208.0.0/16", "pass")]
    monkeypatch.setattr(M, "STRICTEST_COUNTS_SHADOWED_RULES", True)
    assert Model(shadowed).verdict(v4(tcp(22)[:12])) == (DROP, "unparsed_drop")
