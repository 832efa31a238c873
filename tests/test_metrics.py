"""/metrics against the real program: parsed with prometheus_client's text parser, the
Prometheus exposition format reference implementation in Python."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from tests import packets as P
from tests.test_program import add
from xdpfw import netns as nsutil
from xdpfw.api.app import create_app
from xdpfw.rules.model import Action, parse_prefix
from xdpfw.service import RuleSpec

pytestmark = pytest.mark.bpf


def scrape(client: TestClient) -> dict[tuple[str, frozenset], float]:
    r = client.get("/metrics")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain; version="), r.headers
    out = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples, name: str, **labels) -> float:
    key = (name, frozenset(labels.items()))
    assert key in samples, f"{name}{labels} not exported; have: " + ", ".join(
        sorted({n for n, _ in samples})
    )
    return samples[key]


@pytest.fixture
def client(fw):
    return TestClient(create_app(fw))


def test_metrics_count_rules_verdicts_maps_and_program(fw, run, client):
    before = scrape(client)
    drop = add(fw, "198.51.100.0/24", "drop")
    allow = add(fw, "2001:db8:5::/48", "pass", "udp", 53)
    for _ in range(3):
        assert run(P.udp4("198.51.100.7", 9)).verdict == "XDP_DROP"
    assert run(P.udp6("2001:db8:5::1", 53)).verdict == "XDP_PASS"

    m = scrape(client)

    rule = dict(rule_id=str(drop.id), prefix="198.51.100.0/24", action="drop")
    assert value(m, "xdpfw_rule_packets_total", **rule) == 3
    assert value(m, "xdpfw_rule_bytes_total", **rule) == 3 * len(P.udp4("198.51.100.7", 9))
    assert value(m, "xdpfw_rule_packets_total", rule_id=str(allow.id),
                 prefix="2001:db8:5::/48", action="pass") == 1
    assert value(m, "xdpfw_rules", action="drop") == 1
    dropped = ("xdpfw_packets_total", frozenset({"verdict": "drop", "reason": "rule_drop"}.items()))
    assert m[dropped] - before.get(dropped, 0) == 3, m[dropped]
    assert value(m, "xdpfw_map_entries", map="v4_verdicts") == 1
    assert value(m, "xdpfw_map_entries", map="rules_v6") == 1
    # The tcp/22 entry and its port set's STRICT entry (xdpfw/rules/compile.py).
    assert value(m, "xdpfw_map_entries", map="port_rules") == 2
    assert value(m, "xdpfw_map_capacity", map="v4_verdicts") == fw.config.max_rules
    info = fw.program_info()
    assert value(m, "xdpfw_program_loaded", prog_id=str(info.id), tag=info.tag,
                 source="xdpfw.c") == 1


def test_interface_metrics_show_the_attachment(fw, client, make_netns):
    a, b = make_netns("ma"), make_netns("mb")
    # No IPv6 on the new links: the kernel's own MLD/ND chatter on a link just raised would be
    # dropped by the policy and race the "nothing dropped yet" check.
    for ns in (a, b):
        r = nsutil.run_in(ns, ["sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1"])
        assert r.returncode == 0, r.stderr
    nsutil.veth_pair(a, "m0", b, "m1")
    fw.attach_interface("m0", a, mode="generic", policy="drop")
    try:
        m = scrape(client)
        assert value(m, "xdpfw_interface_attached", interface="m0", netns=a, mode="generic") == 1
        assert value(m, "xdpfw_interface_packets_total", interface="m0", netns=a,
                     verdict="dropped") == 0
        assert value(m, "xdpfw_map_entries", map="iface_config") == 1
    finally:
        fw.detach_interface("m0", a)
    m = scrape(client)
    assert not [k for k in m if k[0] == "xdpfw_interface_attached"], "detached yet exported"


def test_batched_counter_read_equals_per_slot_lookups(fw, run):
    rules = [add(fw, f"203.0.113.{i}/32", "drop") for i in range(5)]
    for i in range(len(rules)):
        for _ in range(i):
            run(P.tcp4(f"203.0.113.{i}", 80))
    got = {slot: (p, b) for slot, p, b in fw.maps.matched_rule_counters(fw.rule_slots.high)}
    want = {r.slot: fw.rule_counter(r) for r in rules if fw.rule_counter(r)[0]}
    assert got == want


def test_per_rule_series_are_bounded_to_the_top_rules_and_set_totals(fw, run):
    """A blocklist under attack: every rule matches, yet a scrape holds top_rules rule series
    and max_sets set series (the rest summed under _other), and the totals stay exact. A
    rule's set is its named set, or its comment when it is in none."""
    from xdpfw.metrics import OTHER_SETS, RuleSeries

    client = TestClient(create_app(fw, rule_series=RuleSeries(top_rules=3, max_sets=2)))
    hits = {}
    for i in range(12):
        spec = RuleSpec(parse_prefix(f"203.0.113.{i}/32"), Action.DROP,
                        comment=["blocklist-a", "blocklist-b", "manual", ""][i % 4],
                        rule_set="feed" if i % 3 == 0 else "")
        rule = fw.add_rules([spec])[0]
        hits[rule.id] = (i + 1, spec.rule_set or spec.comment)
        run(P.tcp4(f"203.0.113.{i}", 80), repeat=i + 1)
    m = scrape(client)
    rule_series = {dict(k[1])["rule_id"]: v for k, v in m.items()
                   if k[0] == "xdpfw_rule_packets_total"}
    top = sorted(hits, key=lambda rid: hits[rid][0])[-3:]
    assert rule_series == {str(rid): hits[rid][0] for rid in top}, rule_series
    sets = {dict(k[1])["set"]: v for k, v in m.items() if k[0] == "xdpfw_rule_set_packets_total"}
    per_set: dict[str, int] = {}
    for n, comment in hits.values():
        per_set[comment] = per_set.get(comment, 0) + n
    biggest = sorted(per_set, key=per_set.get)[-2:]
    assert sets == {**{s: per_set[s] for s in biggest},
                    OTHER_SETS: sum(v for s, v in per_set.items() if s not in biggest)}, sets
    assert value(m, "xdpfw_rules_matched") == 12
    assert sum(sets.values()) == sum(n for n, _ in hits.values())


def test_process_metrics_are_exported(client):
    names = {k[0] for k in scrape(client)}
    for name in ("process_cpu_seconds_total", "process_resident_memory_bytes",
                 "process_open_fds", "python_info"):
        assert name in names, f"{name} missing: {sorted(names)}"
