"""The REST API on a fleet node ([fleet]), without etcd: a real Fleet (never started) whose
etcd writers are replaced by recorders. Every write either goes to the fleet (etcd's
writers) or is refused with a 409 naming the way that works; none changes only this node's
store and maps, which the next sync would undo."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from tests.test_api import snapshot
from tests.test_fleet_services import MemEtcd
from xdpfw.api.app import create_app
from xdpfw.config import FleetConfig
from xdpfw.fleet.lb_writer import ServiceWriter
from xdpfw.fleet.service import Fleet
from xdpfw.fleet.writer import FleetWriter
from xdpfw.lb.model import ServiceSpec
from xdpfw.rules.model import Action, Proto, parse_prefix
from xdpfw.service import RuleSpec

pytestmark = pytest.mark.bpf

TEXT = {"content-type": "text/plain"}
LIVE_IN_ETCD = "on a fleet node rules live in etcd"


class Etcd:
    """What the fleet's writers were asked to put in etcd."""

    def __init__(self) -> None:
        self.rules: list[RuleSpec] = []
        self.deleted: list[int] = []
        self.sets: list[tuple] = []
        self.next_id = 1000

    def add_rules(self, specs):
        self.rules += specs
        ids = list(range(self.next_id, self.next_id + len(specs)))
        self.next_id += len(specs)
        return ids, 7

    def delete_rule(self, rule):
        self.deleted.append(rule.id)
        return 8

    def replace_set(self, name, prefixes, action, comment):
        self.sets.append(("put", name, [str(prefixes.prefix(i)) for i in range(len(prefixes))],
                          action, comment))
        return {"name": name, "count": len(prefixes), "revision": 9}

    def delete_set(self, name):
        self.sets.append(("delete", name))
        return 10


@pytest.fixture
def etcd(fw, tmp_path):
    fleet = Fleet(FleetConfig(etcd=["http://127.0.0.1:9"], node="t"), fw, tmp_path)
    rec = Etcd()
    fleet.writer.add_rules = rec.add_rules
    fleet.writer.delete_rule = rec.delete_rule
    fleet.set_writer.replace = rec.replace_set
    fleet.set_writer.delete = rec.delete_set
    fleet.engine.wait_applied = lambda revision, timeout_s: True
    rec.fleet = fleet
    yield rec
    fleet.etcd.close()
    fleet.cache.close()


@pytest.fixture
def client(fw, etcd, tmp_path):
    config = tmp_path / "xdpfw.toml"
    config.write_text('[fleet]\netcd = ["http://127.0.0.1:9"]\nnode = "t"\n')
    with TestClient(create_app(fw, fleet=etcd.fleet, config_path=str(config))) as c:
        yield c


def _documented(client, method: str, path: str, status: int) -> bool:
    return str(status) in client.get("/openapi.json").json()["paths"][path][method]["responses"]


def test_rule_writes_go_to_etcd_in_the_request_order(client, fw, etcd):
    before = snapshot(fw)
    r = client.post("/api/v1/rules", json={"prefix": "192.0.2.0/24", "comment": "one"})
    assert r.status_code == 201 and r.json()["id"] == 1000, r.text
    r = client.post("/api/v1/rules/bulk", content="198.51.100.0/24\n203.0.113.7\n",
                    headers=TEXT, params={"action": "pass", "comment": "list"})
    assert r.status_code == 201 and r.json()["added"] == 2, r.text
    r = client.post("/api/v1/rules/bulk", json={"rules": [
        {"prefix": "10.1.0.0/16", "proto": "tcp", "dport": 22},
        {"prefix": "10.2.0.0/16"},
        {"prefix": "10.3.0.0/16", "proto": "tcp", "dport": 22}]})
    assert r.status_code == 201 and (r.json()["first_id"], r.json()["last_id"]) == (
        1003, 1005), r.text
    assert [(str(s.prefix), s.action, s.proto, s.dport, s.comment) for s in etcd.rules] == [
        ("192.0.2.0/24", Action.DROP, None, None, "one"),
        ("198.51.100.0/24", Action.PASS, None, None, "list"),
        ("203.0.113.7/32", Action.PASS, None, None, "list"),
        ("10.1.0.0/16", Action.DROP, Proto.TCP, 22, ""),
        ("10.2.0.0/16", Action.DROP, None, None, ""),
        ("10.3.0.0/16", Action.DROP, Proto.TCP, 22, ""),
    ]
    assert snapshot(fw) == before, "a fleet write changed this node by itself"
    # A rule this node applied: DELETE asks etcd to delete it.
    rule = fw.add_rules([RuleSpec(parse_prefix("192.0.2.0/24"), Action.DROP)], ids=[77])[0]
    before = snapshot(fw)
    assert client.delete(f"/api/v1/rules/{rule.id}").status_code == 200
    assert etcd.deleted == [77] and snapshot(fw) == before


@pytest.mark.parametrize(("kw", "why"), [
    ({"content": "192.0.2.0/24\n", "params": {"set": "feed"}}, "/api/v1/fleet/sets/feed"),
    ({"content": '@rules {"action": "drop", "set": "feed"}\n192.0.2.0/24\n'},
     "/api/v1/fleet/sets/feed"),
    ({"content": "192.0.2.0/24\n", "params": {"skip_existing": "true"}},
     "/api/v1/fleet/sets/{name}"),
])
def test_a_bulk_body_etcd_rules_cannot_hold_is_refused(client, fw, etcd, kw, why):
    before = snapshot(fw)
    r = client.post("/api/v1/rules/bulk", headers=TEXT, **kw)
    assert r.status_code == 409 and why in r.json()["detail"], r.text
    assert etcd.rules == [] and snapshot(fw) == before
    assert _documented(client, "post", "/api/v1/rules/bulk", 409)
    r = client.post("/api/v1/rules", json={"prefix": "192.0.2.0/24", "set": "feed"})
    assert r.status_code == 409 and "PUT /api/v1/fleet/sets/feed" in r.text, r.text


def test_a_bulk_request_over_one_transaction_is_refused_whole(client, etcd):
    body = "".join(f"10.0.{i}.0/24\n" for i in range(101))
    r = client.post("/api/v1/rules/bulk", content=body, headers=TEXT)
    assert r.status_code == 422 and "at most 100 rules" in r.text, r.text
    assert etcd.rules == []


def test_put_and_delete_of_a_set_write_the_fleet_set(client, fw, etcd):
    before = snapshot(fw)
    r = client.put("/api/v1/sets/feed", content="198.51.100.0/24\n192.0.2.1\n", headers=TEXT,
                   params={"action": "pass", "comment": "partners"})
    assert r.status_code == 200, r.text
    assert r.json() == {"name": "feed", "count": 2, "revision": 9, "applied_here": True}
    doc = {"format": "xdpfw-rules", "version": 1, "sections": [
        {"action": "drop", "comment": "c", "set": "feed", "prefixes": ["10.0.0.0/8"]},
        {"action": "drop", "comment": "c", "prefixes": ["2001:db8::/32"]}]}
    assert client.put("/api/v1/sets/feed", content=json.dumps(doc)).status_code == 200
    r = client.delete("/api/v1/sets/feed")
    assert r.status_code == 200 and r.json()["revision"] == 10, r.text
    assert etcd.sets == [
        ("put", "feed", ["198.51.100.0/24", "192.0.2.1/32"], Action.PASS, "partners"),
        ("put", "feed", ["10.0.0.0/8", "2001:db8::/32"], Action.DROP, "c"),
        ("delete", "feed"),
    ]
    assert snapshot(fw) == before and etcd.rules == []


@pytest.mark.parametrize(("body", "status", "why"), [
    ('@rules {"action": "drop", "proto": "tcp", "dport": 22}\n10.0.0.0/8\n', 409,
     "narrow by protocol (tcp/22)"),
    ('@rules {"action": "drop"}\n10.0.0.0/8\n@rules {"action": "pass"}\n11.0.0.0/8\n', 409,
     "2 different actions or comments"),
    ('@rules {"action": "drop", "set": "other"}\n10.0.0.0/8\n', 422, "set 'other'"),
])
def test_a_set_a_fleet_set_cannot_hold_is_refused(client, fw, etcd, body, status, why):
    before = snapshot(fw)
    for dry_run in (False, True):
        r = client.put("/api/v1/sets/feed", content=body, headers=TEXT,
                       params={"dry_run": dry_run})
        assert r.status_code == status and why in r.json()["detail"], r.text
        if status == 409:
            assert "PUT /api/v1/fleet/sets/feed" in r.json()["detail"]
    assert etcd.sets == [] and snapshot(fw) == before
    assert _documented(client, "put", "/api/v1/sets/{name}", 409)


def test_a_dry_run_of_a_set_compares_with_what_this_node_enforces(client, fw, etcd):
    before = snapshot(fw)
    r = client.put("/api/v1/sets/feed", content="10.0.0.0/8\n", headers=TEXT,
                   params={"dry_run": True})
    assert r.status_code == 200 and (r.json()["added"], r.json()["dry_run"]) == (1, True)
    assert etcd.sets == [] and snapshot(fw) == before


@pytest.mark.parametrize(("method", "path", "kw"), [
    ("put", "/api/v1/rules", {"content": "10.0.0.0/8\n", "headers": TEXT}),
    ("put", "/api/v1/rules", {"content": "10.0.0.0/8\n", "headers": TEXT,
                              "params": {"dry_run": True}}),
    ("post", "/api/v1/rules/delete", {"json": {"ids": [77]}}),
    ("post", "/api/v1/rules/delete", {"json": {"set": "feed"}}),
    ("post", "/api/v1/rules/delete", {"json": {"comment": "x"}}),
    ("post", "/api/v1/config/reload", {}),
])
def test_writes_of_this_node_alone_are_refused(client, fw, etcd, method, path, kw):
    fw.add_rules([RuleSpec(parse_prefix("192.0.2.0/24"), Action.DROP, comment="x",
                           rule_set="feed")], ids=[77])
    before = snapshot(fw)
    r = client.request(method.upper(), path, **kw)
    assert r.status_code == 409 and r.json()["detail"].startswith(LIVE_IN_ETCD), r.text
    assert snapshot(fw) == before and (etcd.rules, etcd.sets, etcd.deleted) == ([], [], [])
    assert _documented(client, method, path, 409)


# Every route that changes rules or services, and what it does on a fleet node. A new one
# fails this test until it is routed to the fleet, refused, or said to be the node's own
# (and added here).
WRITES = {
    ("post", "/api/v1/rules"): "etcd",
    ("delete", "/api/v1/rules/{rule_id}"): "etcd",
    ("post", "/api/v1/rules/bulk"): "etcd",
    ("put", "/api/v1/rules"): "refused",
    ("post", "/api/v1/rules/delete"): "refused",
    ("put", "/api/v1/sets/{name}"): "etcd",
    ("delete", "/api/v1/sets/{name}"): "etcd",
    ("post", "/api/v1/config/reload"): "refused",
    ("put", "/api/v1/fleet/sets/{name}"): "etcd",
    ("delete", "/api/v1/fleet/sets/{name}"): "etcd",
    ("post", "/api/v1/services"): "etcd",
    ("delete", "/api/v1/services/{service_id}"): "etcd",
    ("post", "/api/v1/services/{service_id}/backends"): "etcd",
    ("patch", "/api/v1/services/{service_id}/backends/{backend_id}"): "etcd",
    ("delete", "/api/v1/services/{service_id}/backends/{backend_id}"): "etcd",
    ("put", "/api/v1/cpu-steer"): "node",  # this machine's CPUs
}


def test_every_route_that_changes_rules_or_services_is_accounted_for(client):
    paths = client.get("/openapi.json").json()["paths"]
    writes = {(m, p) for p, ops in paths.items() for m in ops
              if m in ("post", "put", "patch", "delete")
              and p.startswith(("/api/v1/rules", "/api/v1/sets", "/api/v1/config",
                                "/api/v1/fleet", "/api/v1/services", "/api/v1/cpu-steer"))}
    assert writes == set(WRITES)


# -- load-balancer services -------------------------------------------------------------------


@pytest.fixture
def lb_fleet(fw, unresolving_lb, tmp_path):
    """A fleet node with a load balancer whose service writes go to an in-memory etcd, and
    whose wait for its own apply applies what that etcd holds (the watch, in short)."""
    fleet = Fleet(FleetConfig(etcd=["http://127.0.0.1:9"], node="t"), fw, tmp_path,
                  unresolving_lb)
    mem = MemEtcd()
    fleet.service_writer = ServiceWriter(mem, fleet.keys, FleetWriter(mem, fleet.keys))
    applier = fleet.engine.services
    fleet.applies = True

    def wait_applied(revision, timeout_s):
        if not fleet.applies:
            return False
        held = {k for k in mem.kv if k.startswith(fleet.keys.services)}
        for key in sorted(held | set(applier.local_keys())):
            applier.apply(key, mem.kv.get(key))
        return True

    fleet.engine.wait_applied = wait_applied
    fleet.mem = mem
    yield fleet
    fleet.etcd.close()
    fleet.cache.close()


def _lb_client(fw, lb, fleet) -> TestClient:
    return TestClient(create_app(fw, lb=lb, fleet=fleet))


SVC = {"vip": "10.96.0.10", "port": 80, "backends": [{"address": "10.96.1.1"},
                                                     {"address": "10.96.1.2"}]}


def test_service_writes_go_to_etcd_and_answer_with_this_nodes_apply(fw, unresolving_lb,
                                                                     lb_fleet):
    lb, mem, keys = unresolving_lb, lb_fleet.mem, lb_fleet.keys
    with _lb_client(fw, lb, lb_fleet) as c:
        r = c.post("/api/v1/services", json=SVC)
        assert r.status_code == 201, r.text
        svc = r.json()
        assert svc["id"] == 1 and [b["id"] for b in svc["backends"]] == [2, 3]
        assert not svc["backends"][0]["resolved"] and svc["backends"][0]["error"]
        assert json.loads(mem.kv[keys.service(1)].value)["backends"][1] == {
            "id": 3, "address": "10.96.1.2", "weight": 1, "state": "active"}
        r = c.patch("/api/v1/services/1/backends/2", json={"state": "draining"})
        assert r.status_code == 200 and r.json()["state"] == "draining", r.text
        r = c.post("/api/v1/services/1/backends", json={"address": "10.96.1.3", "weight": 2})
        assert r.status_code == 201 and r.json()["id"] == 4, r.text
        r = c.delete("/api/v1/services/1/backends/3")
        assert r.status_code == 200 and r.json()["address"] == "10.96.1.2", r.text
        got = c.get("/api/v1/services/1").json()
        assert [(b["id"], b["state"], b["weight"]) for b in got["backends"]] == [
            (2, "draining", 1), (4, "active", 2)]
        held = json.loads(mem.kv[keys.service(1)].value)
        assert [(b["id"], b["state"]) for b in held["backends"]] == [
            (2, "draining"), (4, "active")]
        # What a single appliance refuses is refused, and etcd is left alone.
        revision = mem.revision
        assert c.post("/api/v1/services", json=SVC).status_code == 409
        assert c.post("/api/v1/services/1/backends",
                      json={"address": "10.96.1.1"}).status_code == 409
        assert c.patch("/api/v1/services/9/backends/2", json={"weight": 2}).status_code == 404
        assert c.delete("/api/v1/services/1/backends/9").status_code == 404
        assert c.post("/api/v1/services", json={**SVC, "port": 81,
                                                "cpu_steer": [4095]}).status_code == 422
        assert mem.revision == revision
        r = c.delete("/api/v1/services/1")
        assert r.status_code == 200 and r.json()["id"] == 1, r.text
        assert keys.service(1) not in mem.kv and c.get("/api/v1/services").json() == []


def test_a_write_not_applied_here_in_time_says_so(fw, unresolving_lb, lb_fleet):
    lb_fleet.applies = False
    with _lb_client(fw, unresolving_lb, lb_fleet) as c:
        r = c.post("/api/v1/services", json=SVC)
        assert r.status_code == 202 and r.json() == {"id": 1, "applied_here": False}, r.text
        assert unresolving_lb.list_services() == []
        assert lb_fleet.keys.service(1) in lb_fleet.mem.kv
        assert _documented(c, "post", "/api/v1/services", 202)


def test_service_writes_are_refused_while_etcd_is_away_and_reads_served(
        fw, unresolving_lb, tmp_path):
    fleet = Fleet(FleetConfig(etcd=["http://127.0.0.1:9"], node="t", timeout_s=0.5), fw,
                  tmp_path, unresolving_lb)
    local = unresolving_lb.create_service(ServiceSpec("10.96.0.20", 80))
    try:
        with _lb_client(fw, unresolving_lb, fleet) as c:
            for method, path, kw in [
                ("post", "/api/v1/services", {"json": SVC}),
                ("delete", f"/api/v1/services/{local.rec.id}", {}),
                ("post", f"/api/v1/services/{local.rec.id}/backends",
                 {"json": {"address": "10.96.1.9"}}),
                ("patch", f"/api/v1/services/{local.rec.id}/backends/1",
                 {"json": {"weight": 2}}),
            ]:
                r = c.request(method.upper(), path, **kw)
                assert r.status_code == 503 and "etcd is unreachable" in r.text, r.text
            assert [s["id"] for s in c.get("/api/v1/services").json()] == [local.rec.id]
    finally:
        fleet.etcd.close()
        fleet.cache.close()
