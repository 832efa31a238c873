"""The real XDP program under BPF_PROG_TEST_RUN: every verdict path, as scenario tables."""

from __future__ import annotations

import pytest

from tests import packets as P
from tests.conftest import TEST_SLOT
from xdpfw.dataplane import abi
from xdpfw.rules.model import Action, Proto, parse_prefix
from xdpfw.service import RuleSpec

pytestmark = pytest.mark.bpf

PASS, DROP = "XDP_PASS", "XDP_DROP"


def add(fw, prefix: str, action: str = "drop", proto: str | None = None, dport=None):
    spec = RuleSpec(parse_prefix(prefix), Action(action), Proto(proto) if proto else None, dport)
    return fw.add_rules([spec])[0]


def check(run, fw, cases):
    """cases: (description, packet, expected verdict). Reports every mismatch at once."""
    failures = []
    for desc, pkt, want in cases:
        got = run(pkt).verdict
        if got != want:
            failures.append(f"{desc}: expected {want}, got {got}")
    assert not failures, "\n".join(failures) + f"\nrules: {fw.list_rules()}"


def set_policy(fw, policy=abi.POLICY_PASS, unparsed=abi.POLICY_PASS, flags=0):
    fw.maps.set_policy(TEST_SLOT, policy, unparsed, flags)


def test_no_rules_pass_policy_passes_everything(run, fw):
    check(run, fw, [
        ("tcp v4", P.tcp4("10.0.0.1", 22), PASS),
        ("udp v6", P.udp6("2001:db8::5", 53), PASS),
        ("arp", P.arp("10.0.0.1"), PASS),
    ])


def test_longest_prefix_wins(run, fw):
    add(fw, "10.0.0.0/8", "drop")
    add(fw, "10.1.2.0/24", "pass")
    check(run, fw, [
        ("inside the allowed /24", P.tcp4("10.1.2.7", 80), PASS),
        ("inside the /8 only", P.tcp4("10.9.9.9", 80), DROP),
        ("outside both", P.tcp4("11.0.0.1", 80), PASS),
    ])


def test_port_and_protocol_rules(run, fw):
    add(fw, "203.0.113.0/24", "drop", "tcp", 22)
    add(fw, "198.51.100.0/24", "drop", "icmp")
    check(run, fw, [
        ("tcp 22 from blocked net", P.tcp4("203.0.113.9", 22), DROP),
        ("tcp 80 from same net", P.tcp4("203.0.113.9", 80), PASS),
        ("udp 22 from same net", P.udp4("203.0.113.9", 22), PASS),
        ("icmp from icmp-blocked net", P.icmp4("198.51.100.3"), DROP),
        ("tcp from icmp-blocked net", P.tcp4("198.51.100.3", 443), PASS),
    ])


def test_port_only_prefix_inherits_from_enclosing_prefix(run, fw):
    add(fw, "10.0.0.0/8", "drop")
    add(fw, "10.1.0.0/16", "pass", "tcp", 80)
    check(run, fw, [
        ("allowed port in the /16", P.tcp4("10.1.2.3", 80), PASS),
        ("other port in the /16 falls back to the /8", P.tcp4("10.1.2.3", 81), DROP),
        ("udp in the /16 falls back to the /8", P.udp4("10.1.2.3", 80), DROP),
    ])


def test_longer_any_rule_beats_shorter_port_rule(run, fw):
    add(fw, "10.0.0.0/8", "drop", "tcp", 22)
    add(fw, "10.1.0.0/16", "pass")
    check(run, fw, [
        ("tcp 22 in the /16", P.tcp4("10.1.0.1", 22), PASS),
        ("tcp 22 elsewhere in the /8", P.tcp4("10.2.0.1", 22), DROP),
    ])


def test_most_specific_match_wins_on_the_same_prefix(run, fw):
    add(fw, "192.0.2.0/24", "drop")
    add(fw, "192.0.2.0/24", "pass", "tcp")
    add(fw, "192.0.2.0/24", "drop", "tcp", 23)
    check(run, fw, [
        ("tcp 23", P.tcp4("192.0.2.5", 23), DROP),
        ("tcp 443", P.tcp4("192.0.2.5", 443), PASS),
        ("udp", P.udp4("192.0.2.5", 53), DROP),
    ])


def test_proto_rule_on_longer_prefix_beats_port_rule_of_ancestor(run, fw):
    add(fw, "10.0.0.0/8", "pass", "tcp", 22)
    add(fw, "10.1.0.0/16", "drop", "tcp")
    check(run, fw, [
        ("tcp 22 in the /16: the /16's proto rule is longer", P.tcp4("10.1.0.1", 22), DROP),
        ("tcp 22 elsewhere", P.tcp4("10.3.0.1", 22), PASS),
    ])


def test_vlan_tags(run, fw):
    add(fw, "10.0.0.0/8", "drop", "udp", 53)
    check(run, fw, [
        ("802.1Q", P.udp4("10.0.0.1", 53, vlans=(100,)), DROP),
        ("QinQ", P.udp4("10.0.0.1", 53, vlans=(100, 200)), DROP),
        ("QinQ, other port", P.udp4("10.0.0.1", 54, vlans=(100, 200)), PASS),
    ])


def test_unparsed_packets_follow_their_policy(run, fw):
    add(fw, "10.0.0.0/8", "pass")  # a rule must not rescue an unreadable packet
    good = P.tcp4("10.0.0.1", 22)
    bad = [
        ("three VLAN tags", P.tcp4("10.0.0.1", 22, vlans=(1, 2, 3))),
        ("ihl < 5", P.eth(P.ETH_IP, b"\x44" + P.ipv4("10.0.0.1", "192.0.2.1", 6, P.l4(6, 22))[1:])),
        ("truncated IPv4", good[:14 + 12]),
        ("truncated TCP", good[:14 + 20 + 10]),
        ("tcp doff < 5", P.eth(P.ETH_IP, P.ipv4("10.0.0.1", "192.0.2.1", 6, P.l4(6, 22, doff=4)))),
        ("Ethernet header only", good[:14]),
    ]
    check(run, fw, [(d, p, PASS) for d, p in bad])
    set_policy(fw, unparsed=abi.POLICY_DROP)
    before = fw.maps.reason_totals()["unparsed_drop"][0]
    check(run, fw, [(d, p, DROP) for d, p in bad] + [("well-formed", good, PASS)])
    assert fw.maps.reason_totals()["unparsed_drop"][0] - before == len(bad)


def test_ipv4_options_and_fragments(run, fw):
    add(fw, "10.0.0.0/8", "drop", "tcp", 22)
    add(fw, "172.16.0.0/12", "drop", "udp")
    opts = P.eth(P.ETH_IP, P.ipv4("10.0.0.1", "192.0.2.1", P.TCP, P.l4(P.TCP, 22), ihl=7))
    tail = P.eth(P.ETH_IP, P.ipv4("10.0.0.1", "192.0.2.1", P.TCP, b"\x00\x16" * 10, frag=100))
    utail = P.eth(P.ETH_IP, P.ipv4("172.16.0.1", "192.0.2.1", P.UDP, b"\0" * 16, frag=100))
    check(run, fw, [
        ("ports read after IPv4 options", opts, DROP),
        ("non-first fragment has no ports: port rule cannot match", tail, PASS),
        ("non-first fragment matches a protocol rule", utail, DROP),
    ])


def test_ipv6_extension_headers(run, fw):
    add(fw, "2001:db8:bad::/48", "drop", "tcp", 22)
    src = "2001:db8:bad::1"
    chain = P.ext(P.DSTOPTS, P.HOPOPTS) + P.ext(P.ROUTING, P.DSTOPTS) + P.ext(P.TCP, P.ROUTING)
    first_frag = P.ext(P.TCP, P.FRAGMENT, frag_offset=0)
    later_frag = P.ext(P.TCP, P.FRAGMENT, frag_offset=100)
    ah = P.ext(P.TCP, P.AH)
    too_many = b"".join(P.ext(P.DSTOPTS, P.DSTOPTS) for _ in range(7)) + P.ext(P.TCP, P.DSTOPTS)

    def v6(nexthdr, exts):
        return P.eth(P.ETH_IPV6, P.ipv6(src, "2001:db8::1", nexthdr, exts + P.l4(P.TCP, 22)))

    check(run, fw, [
        ("plain", P.tcp6(src, 22), DROP),
        ("hop-by-hop, routing, destination options", v6(P.HOPOPTS, chain), DROP),
        ("first fragment", v6(P.FRAGMENT, first_frag), DROP),
        ("later fragment: no ports", v6(P.FRAGMENT, later_frag), PASS),
        ("AH", v6(P.AH, ah), DROP),
        ("other port", P.tcp6(src, 23), PASS),
        ("other source", P.tcp6("2001:db8:600d::1", 22), PASS),
    ])
    set_policy(fw, unparsed=abi.POLICY_DROP)
    check(run, fw, [("more extension headers than the bound", v6(P.DSTOPTS, too_many), DROP)])


def test_drop_policy_keeps_arp_and_neighbour_discovery(run, fw):
    set_policy(fw, policy=abi.POLICY_DROP)
    add(fw, "10.0.0.0/24", "pass")
    check(run, fw, [
        ("allowed source", P.tcp4("10.0.0.7", 22), PASS),
        ("unlisted source", P.tcp4("10.0.1.7", 22), DROP),
        ("ARP", P.arp("10.0.1.7"), PASS),
        ("neighbour solicitation", P.icmp6("fe80::1", 135), PASS),
        ("neighbour advertisement", P.icmp6("fe80::1", 136), PASS),
        ("ICMPv6 echo", P.icmp6("fe80::1", 128), DROP),
    ])
    set_policy(fw, policy=abi.POLICY_DROP, flags=abi.IFF_GUARD_L2)
    check(run, fw, [
        ("ARP with guard_l2", P.arp("10.0.1.7"), DROP),
        ("neighbour solicitation with guard_l2", P.icmp6("fe80::1", 135), DROP),
    ])


def test_counters_per_rule_and_reason(run, fw):
    drop = add(fw, "10.0.0.0/8", "drop")
    allow = add(fw, "10.1.0.0/16", "pass", "tcp", 443)
    before = fw.maps.reason_totals()
    pkt = P.tcp4("10.1.1.1", 443)
    run(pkt, repeat=5)
    run(P.tcp4("10.2.2.2", 443), repeat=3)
    assert fw.rule_counter(allow) == (5, 5 * len(pkt))
    assert fw.rule_counter(drop)[0] == 3
    after = fw.maps.reason_totals()
    assert after["rule_pass"][0] - before["rule_pass"][0] == 5
    assert after["rule_drop"][0] - before["rule_drop"][0] == 3


def test_deleting_a_rule_restores_traffic_and_a_new_rule_starts_at_zero(run, fw):
    rule = add(fw, "10.0.0.0/8", "drop")
    run(P.tcp4("10.0.0.1", 1), repeat=4)
    assert run(P.tcp4("10.0.0.1", 1)).verdict == DROP
    fw.delete_rule(rule.id)
    assert run(P.tcp4("10.0.0.1", 1)).verdict == PASS
    again = add(fw, "10.0.0.0/8", "drop")
    assert again.slot == rule.slot, "the freed counter slot is reused"
    assert fw.rule_counter(again) == (0, 0), "a reused slot must not inherit old counts"


def test_ipv6_longest_prefix(run, fw):
    add(fw, "2001:db8::/32", "drop")
    add(fw, "2001:db8:1::/48", "pass")
    check(run, fw, [
        ("in /48", P.tcp6("2001:db8:1::9", 80), PASS),
        ("in /32 only", P.tcp6("2001:db8:2::9", 80), DROP),
    ])


def test_host_rules_answer_from_the_host_hash_with_the_same_semantics(run, fw):
    add(fw, "10.0.0.0/8", "drop")
    add(fw, "10.0.0.7/32", "pass")
    add(fw, "10.0.0.8/32", "pass", "tcp", 443)  # port-only host: inherits the /8 for the rest
    add(fw, "2001:db8::/32", "drop")
    add(fw, "2001:db8::7/128", "pass")
    assert len(fw.maps.v4) == 3 and fw.maps.hosts_v6.has_keys()
    check(run, fw, [
        ("allowed host inside a dropped /8", P.tcp4("10.0.0.7", 80), PASS),
        ("host's neighbour", P.tcp4("10.0.0.6", 80), DROP),
        ("port-only host, its port", P.tcp4("10.0.0.8", 443), PASS),
        ("port-only host, other port falls back to the /8", P.tcp4("10.0.0.8", 80), DROP),
        ("allowed IPv6 host", P.tcp6("2001:db8::7", 22), PASS),
        ("IPv6 neighbour", P.tcp6("2001:db8::6", 22), DROP),
    ])
    rule = next(r for r in fw.list_rules() if str(r.prefix) == "10.0.0.7/32")
    fw.delete_rule(rule.id)
    assert run(P.tcp4("10.0.0.7", 80)).verdict == DROP, "deleted host rule still answers"
