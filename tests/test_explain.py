"""Explain (Firewall.explain, GET /api/v1/explain) against an independent model: the verdict,
the reason and the deciding rule the loaded program reports for a probe are those of
tests/packet_model.py (written from the README alone) for the same frame, and the covering
rules are those a brute-force scan finds. An explain counts nothing."""

from __future__ import annotations

import ipaddress
import random

import pytest
from fastapi.testclient import TestClient

from tests.conftest import TEST_SLOT
from tests.packet_model import ICMP, ICMPV6, TCP, UDP, Iface, Model
from tests.packet_model import Rule as ModelRule
from xdpfw.api.app import create_app
from xdpfw.dataplane import abi
from xdpfw.explain import ANY_PROTO, Probe
from xdpfw.rules.model import Action, Proto, parse_prefix
from xdpfw.service import RuleSpec

pytestmark = pytest.mark.bpf


def random_rules(rng: random.Random, n: int) -> list[ModelRule]:
    out: dict[tuple, ModelRule] = {}
    while len(out) < n:
        if rng.random() < 0.25:
            plen = rng.choice((32, 48, 64, 64, 112, 128))
            net = (0x20010DB8 << 96) | (rng.getrandbits(8) << 88) | rng.getrandbits(88)
            prefix = str(ipaddress.IPv6Network(((net >> (128 - plen)) << (128 - plen), plen)))
        else:
            plen = rng.choice((8, 16, 20, 24, 24, 26, 30, 32, 32))
            net = (38 << 24) | (rng.getrandbits(8) << 16) | rng.getrandbits(16)
            prefix = str(ipaddress.IPv4Network(((net >> (32 - plen)) << (32 - plen), plen)))
        proto = rng.choice([None, None, None, "tcp", "udp", "icmp"])
        dport = rng.choice([None, 22, 53]) if proto in ("tcp", "udp") else None
        rule = ModelRule(prefix, rng.choice(["drop", "pass"]), proto, dport)
        out[(prefix, proto, dport)] = rule
    return list(out.values())


def sources(rules: list[ModelRule], rng: random.Random) -> list[str]:
    out = []
    for r in rules:
        net = r.network
        for off in (0, net.num_addresses - 1, rng.randrange(net.num_addresses)):
            out.append(str(net.network_address + off))
    return [*out, f"38.{rng.randrange(256)}.{rng.randrange(256)}.1", "192.0.2.1", "2001:db8::"]


def ip_proto(proto: Proto | None, v6: bool) -> int:
    if proto is None:
        return ANY_PROTO
    return {Proto.TCP: TCP, Proto.UDP: UDP}.get(proto, ICMPV6 if v6 else ICMP)


def key(r) -> tuple:
    """A rule's match, in both worlds."""
    proto = getattr(r.proto, "value", r.proto)
    return (str(parse_prefix(str(r.prefix))), proto, r.dport)


@pytest.mark.parametrize("seed", range(4))
def test_explain_agrees_with_the_model(fw, seed):
    rng = random.Random(seed)
    rules = random_rules(rng, 40)
    fw.add_rules([RuleSpec(parse_prefix(r.prefix), Action(r.action),
                           Proto(r.proto) if r.proto else None, r.dport) for r in rules])
    policy = rng.choice(["pass", "drop"])
    fw.maps.set_policy(TEST_SLOT, abi.POLICY_DROP if policy == "drop" else abi.POLICY_PASS,
                       abi.POLICY_PASS, 0)
    model = Model(rules, Iface(policy=policy))
    counted = (fw.maps.reason_totals(), list(fw.maps.matched_rule_counters(1 << 16)))
    bad = []
    for src in sources(rules, rng):
        v6 = ":" in src
        for proto, dport in ((None, None), (Proto.TCP, 22), (Proto.TCP, 80), (Proto.UDP, 53),
                             (Proto.ICMP, None)):
            probe = Probe.of(src, proto=proto, dport=dport)
            e = fw.explain(probe)
            verdict, reason = model.verdict(probe.frame())
            want_rule = model.match(ipaddress.ip_address(src), ip_proto(proto, v6), dport)
            got = (e.verdict, e.reason, key(e.rule) if e.rule else None)
            want = (verdict.removeprefix("XDP_").lower(), reason,
                    key(want_rule) if want_rule else None)
            if got != want:
                bad.append((probe.describe(), got, want))
            covering = sorted((r for r in rules if ipaddress.ip_address(src) in r.network),
                              key=lambda r: (-r.network.prefixlen, r.dport is None,
                                             r.proto is None))
            tiers = [(r.network.prefixlen, r.proto is None, r.dport is None) for r in covering]
            got_tiers = [(r.prefix.length, r.proto is None, r.dport is None) for r in e.covering]
            assert got_tiers == tiers and {key(r) for r in e.covering} == set(map(key, covering))
    assert not bad, f"{len(bad)} explanations differ from the model, first {bad[:3]}"
    assert (fw.maps.reason_totals(), list(fw.maps.matched_rule_counters(1 << 16))) == counted, \
        "an explain was counted"


def test_explain_over_the_api(fw):
    """What was seen: no way to ask which rule decides for 38.158.13.5."""
    with TestClient(create_app(fw)) as c:
        for body in ({"prefix": "38.158.13.0/24", "comment": "scanners"},
                     {"prefix": "38.158.0.0/16", "proto": "tcp", "dport": 22, "action": "pass"}):
            assert c.post("/api/v1/rules", json=body).status_code == 201
        r = c.get("/api/v1/explain", params={"src": "38.158.13.5", "proto": "tcp",
                                             "dport": 22})
        assert r.status_code == 200, r.text
        out = r.json()
        assert (out["verdict"], out["reason"], out["rule"]["prefix"]) == (
            "drop", "rule_drop", "38.158.13.0/24"), out
        assert out["packet"] == "tcp/22 from 38.158.13.5 to 192.0.2.1"
        assert [x["prefix"] for x in out["covering"]] == ["38.158.13.0/24", "38.158.0.0/16"]
        assert out["interface"] is None and out["policy"] == "pass"
        out = c.get("/api/v1/explain", params={"src": "38.158.14.5", "proto": "udp",
                                               "dport": 22}).json()
        assert (out["verdict"], out["reason"], out["rule"]) == ("pass", "policy_pass", None)
        for params, status, reason in [
            ({"src": "38.158.13.300"}, 422, "not an IPv4 or IPv6 address"),
            ({"src": "38.158.13.5", "dport": 22}, 422, "needs a protocol"),
            ({"src": "38.158.13.5", "dst": "2001:db8::1"}, 422, "one address family"),
            ({"src": "38.158.13.5", "interface": "nosuch0"}, 404, "not attached"),
        ]:
            r = c.get("/api/v1/explain", params=params)
            assert r.status_code == status and reason in r.text, (params, r.text)
