"""The compiler against a brute-force reading of the rule semantics.

The kernel's view is simulated from the compiled state (longest prefix in the trie, then the
port table, then the fallback), and compared with "longest prefix wins, then the most
specific match" evaluated over the raw rules, for random rule sets and packets, through
random adds and deletes.
"""

from __future__ import annotations

import random

import pytest

from xdpfw.dataplane.abi import ACT_NONE, NO_PORT_SET
from xdpfw.rules.compile import ACTION_CODE, RuleIndex, port_match
from xdpfw.rules.model import V4, Action, Prefix, Proto, Rule, ip_proto

PROTOS = [None, Proto.TCP, Proto.UDP, Proto.ICMP]


def brute_force(rules: list[Rule], addr: int, proto: int, dport: int) -> int:
    best = None
    for r in rules:
        p = r.prefix
        if addr >> (32 - p.length) != p.net >> (32 - p.length) if p.length else False:
            continue
        if r.proto is not None and ip_proto(r.proto, V4) != proto:
            continue
        if r.dport is not None and r.dport != dport:
            continue
        specificity = (r.proto is not None) + (r.dport is not None)
        rank = (p.length, specificity)
        if best is None or rank > best[0]:
            best = (rank, r)
    return ACT_NONE if best is None else ACTION_CODE[best[1].action]


def kernel_view(index: RuleIndex, addr: int, proto: int, dport: int) -> int:
    match = None
    for p in index.prefix_values:
        inside = p.length == 0 or addr >> (32 - p.length) == p.net >> (32 - p.length)
        if inside and (match is None or p.length > match.length):
            match = p
    if match is None:
        return ACT_NONE
    _slot, action, port_set = index.prefix_values[match]
    if port_set != NO_PORT_SET:
        table = index.port_entries[match]
        hit = table.get((proto, dport)) if dport else None
        hit = hit or table.get((proto, 0))
        if hit:
            return hit[1]
    return action


def random_rule(rng: random.Random, rid: int) -> Rule:
    # A small address space (10.0.0.0/16, lengths 8..24) so that rules nest and collide often.
    length = rng.choice([8, 12, 16, 17, 20, 24])
    net = (10 << 24) | (rng.getrandbits(16) << 8)
    net &= ((1 << length) - 1) << (32 - length)
    proto = rng.choice(PROTOS)
    dport = rng.choice([None, 22, 80]) if proto in (Proto.TCP, Proto.UDP) else None
    action = rng.choice([Action.DROP, Action.PASS])
    return Rule(rid, Prefix(V4, net, length), action, proto, dport, slot=rid)


@pytest.mark.parametrize("seed", range(12))
def test_compiled_state_matches_brute_force(seed):
    rng = random.Random(seed)
    index = RuleIndex()
    rules: dict[tuple, Rule] = {}
    for step in range(60):
        if rules and rng.random() < 0.3:
            victim = rules.pop(rng.choice(list(rules)))
            index.remove([victim])
        else:
            r = random_rule(rng, step)
            if r.match_key in rules:
                continue
            rules[r.match_key] = r
            index.add([r])
        for _ in range(40):
            addr = (10 << 24) | rng.getrandbits(16) << 8 | rng.getrandbits(8)
            proto = rng.choice([6, 17, 1])
            dport = rng.choice([22, 80, 443]) if proto != 1 else 0
            want = brute_force(list(rules.values()), addr, proto, dport)
            got = kernel_view(index, addr, proto, dport)
            assert got == want, (
                f"seed {seed} step {step}: packet from {addr >> 24}.{addr >> 16 & 255}."
                f"{addr >> 8 & 255}.{addr & 255} proto {proto} dport {dport}: compiled "
                f"verdict {got}, semantics say {want}; rules: {sorted(map(str, rules.values()))}"
            )


def test_changes_replayed_on_a_map_equal_the_compiled_state():
    """Applying every Changes set in order to a dict gives exactly the compiled state."""
    rng = random.Random(7)
    index = RuleIndex()
    tries: dict[Prefix, tuple] = {}
    ports: dict[tuple, tuple] = {}
    live: list[Rule] = []
    for step in range(200):
        if live and rng.random() < 0.4:
            ch = index.remove([live.pop(rng.randrange(len(live)))])
        else:
            r = random_rule(rng, step)
            if index.find(*r.match_key):
                continue
            live.append(r)
            ch = index.add([r])
        ports.update(ch.ports)
        tries.update(ch.prefixes)
        for p in ch.deleted_prefixes:
            del tries[p]
        for k in ch.deleted_ports:
            del ports[k]
    assert tries == index.prefix_values
    expected_ports = {
        (index.port_set_ids[p], *pm): v
        for p, table in index.port_entries.items()
        for pm, v in table.items()
    }
    assert ports == expected_ports


def test_complex_holds_only_prefixes_with_port_rules_or_entries():
    """`complex` is the compiled state of prefixes that are not just their own rule; the
    plain paths (Firewall's columns) never look there. A prefix whose last port rule went
    once stayed in it with its own verdict, and a plain bulk delete then left it behind."""
    rng = random.Random(11)
    index = RuleIndex()
    live: list[Rule] = []
    for step in range(300):
        if live and rng.random() < 0.45:
            index.remove([live.pop(rng.randrange(len(live)))])
        else:
            r = random_rule(rng, step)
            if index.find(*r.match_key):
                continue
            live.append(r)
            index.add([r])
        stale = [p for p in index.complex
                 if p not in index.port_rules and p not in index.port_entries]
        assert not stale, f"step {step}: {stale} in complex with no port rule"


def test_plain_prefix_rules_need_no_port_table():
    index = RuleIndex()
    rules = [
        Rule(i, Prefix(V4, (10 << 24) | (i << 8), 24), Action.DROP, slot=i) for i in range(100)
    ]
    ch = index.add(rules)
    assert len(ch.prefixes) == 100 and not ch.ports
    assert all(v[2] == NO_PORT_SET for v in ch.prefixes.values())


def test_a_change_touches_only_the_prefix_and_port_only_prefixes_inside_it():
    index = RuleIndex()
    base = [Rule(i, Prefix(V4, (10 << 24) | (i << 8), 24), Action.DROP, slot=i) for i in range(50)]
    index.add(base)
    port_only = Rule(100, Prefix(V4, (11 << 24), 16), Action.PASS, Proto.TCP, 80, slot=100)
    index.add([port_only])
    ch = index.add([Rule(101, Prefix(V4, 11 << 24, 8), Action.DROP, slot=101)])
    assert set(ch.prefixes) == {Prefix(V4, 11 << 24, 8), port_only.prefix}
    assert port_match(port_only) == (6, 80)
