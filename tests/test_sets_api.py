"""The sets API (/api/v1/sets), bulk delete, skip_existing, covering, and the audit trail,
on a real Firewall: status codes, reasons, and no change on error."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import pytest
from fastapi.testclient import TestClient

from tests.test_api import snapshot
from xdpfw.api.app import create_app

pytestmark = pytest.mark.bpf

TEXT = {"content-type": "text/plain"}


@pytest.fixture
def client(fw):
    with TestClient(create_app(fw)) as c:
        yield c


def put_set(client, name: str, lines: list[str], **params):
    return client.put(f"/api/v1/sets/{name}", content="\n".join(lines) + "\n", headers=TEXT,
                      params=params)


def test_put_get_list_delete_a_set(client, fw):
    r = put_set(client, "feed", ["198.51.100.0/24", "203.0.113.7", "2001:db8:bad::/48"],
                comment="drop list")
    assert r.status_code == 200, r.text
    assert r.json() | {"examples": None} == {
        "added": 3, "removed": 0, "kept": 0, "changed": 0, "first_id": r.json()["first_id"],
        "last_id": r.json()["first_id"] + 2, "dry_run": False, "examples": None}
    r = put_set(client, "feed", ["198.51.100.0/24", "192.0.2.0/24"], comment="drop list")
    assert (r.json()["added"], r.json()["removed"], r.json()["kept"]) == (1, 2, 1), r.text
    assert client.get("/api/v1/sets").json() == [{"name": "feed", "rules": 2}]
    assert client.get("/api/v1/sets/feed").json() == {"name": "feed", "rules": 2}
    page = client.get("/api/v1/rules", params={"set": "feed"}).json()
    assert sorted(i["prefix"] for i in page["items"]) == ["192.0.2.0/24", "198.51.100.0/24"]
    assert {i["set"] for i in page["items"]} == {"feed"}
    r = client.delete("/api/v1/sets/feed")
    assert r.status_code == 200 and r.json()["removed"] == 2, r.text
    assert client.get("/api/v1/sets/feed").status_code == 404
    assert client.delete("/api/v1/sets/feed").status_code == 404
    assert fw.maps.prefix_keys() == []


@pytest.mark.parametrize("name", ["..", ".hidden", "a b", "x" * 65, "ünï", "-x", "a;rm",
                                  "%2e%2e", "a%2Fb", "..%2F..%2Fetc"])
def test_odd_set_names_are_refused_and_create_nothing(client, fw, name):
    before = snapshot(fw)
    r = client.put(f"/api/v1/sets/{name}", content="10.0.0.0/8\n", headers=TEXT)
    assert r.status_code in (404, 405, 422), r.text
    if r.status_code == 422:
        assert "set name" in r.text or "at most 64" in r.text, r.text
    assert snapshot(fw) == before and client.get("/api/v1/sets").json() == []


def test_a_set_cannot_take_another_sets_rules(client, fw):
    """A body holding another set's rule (or a rule in no set) is a 409 naming both, and
    changes nothing: one feed cannot steal or rewrite another's entries."""
    assert put_set(client, "a", ["10.0.0.0/8", "10.1.0.0/16"]).status_code == 200
    assert client.post("/api/v1/rules", json={"prefix": "192.0.2.0/24"}).status_code == 201
    before = snapshot(fw)
    r = put_set(client, "b", ["172.16.0.0/12", "10.1.0.0/16"])
    assert r.status_code == 409 and "in set 'a'" in r.text and "set 'b'" in r.text, r.text
    r = put_set(client, "b", ["192.0.2.0/24"])
    assert r.status_code == 409 and "in no set" in r.text, r.text
    r = client.put("/api/v1/sets/b", json={"rules": [{"prefix": "11.0.0.0/8", "set": "a"}]})
    assert r.status_code == 422 and "name set 'a'" in r.text, r.text
    assert snapshot(fw) == before


def test_bad_bodies_are_refused_and_change_nothing(client, fw):
    assert put_set(client, "a", ["10.0.0.0/8"]).status_code == 200
    before = snapshot(fw)
    for body, headers, status, reason in [
        ("# nothing\n", TEXT, 422, "DELETE /api/v1/sets/a"),
        ("10.0.0.0/8\n10.0.0.1/8\n", TEXT, 422, "line 2"),
        ("10.0.0.0/8\n10.0.0.0/8\n", TEXT, 409, "twice"),
        ('@rules {"action": "reject"}\n10.0.0.0/8\n', TEXT, 422, "line 1"),
        ("@include /etc/passwd\n", TEXT, 422, "section header"),
        ('{"prefixes": ["10.0.0.0/8"], "dport": 22}', {}, 422, "needs a protocol"),
        ('{"prefixes": ["10.0.0.0/8\\n11.0.0.0/8"]}', {}, 422, "prefixes item 1"),
        ('{"prefixes": ["10.0.0.0/8", ""]}', {}, 422, "prefixes item 2"),
        ("<x/>", {"content-type": "application/xml"}, 415, "text/plain"),
    ]:
        r = client.put("/api/v1/sets/a", content=body, headers=headers)
        assert r.status_code == status and reason in r.text, (body, r.text)
    assert snapshot(fw) == before


def test_dry_run_says_what_would_change_and_changes_nothing(client, fw):
    assert put_set(client, "a", ["10.0.0.0/8", "11.0.0.0/8"]).status_code == 200
    before = snapshot(fw)
    r = put_set(client, "a", ["11.0.0.0/8", "12.0.0.0/8"], dry_run="true")
    assert r.status_code == 200, r.text
    out = r.json()
    assert (out["added"], out["removed"], out["kept"], out["dry_run"]) == (1, 1, 1, True)
    assert out["examples"]["added"] == ["12.0.0.0/8 drop"]
    assert out["examples"]["removed"] == ["10.0.0.0/8 drop"]
    assert snapshot(fw) == before


def test_json_bodies_and_port_rules_in_a_set(client, fw):
    r = client.put("/api/v1/sets/ssh", json={"rules": [
        {"prefix": "203.0.113.0/24", "proto": "tcp", "dport": 22, "action": "drop"},
        {"prefix": "203.0.113.0/24", "action": "pass", "comment": "office"}]})
    assert r.status_code == 200 and r.json()["added"] == 2, r.text
    r = client.put("/api/v1/sets/ssh", json={"prefixes": ["203.0.113.0/24"], "proto": "tcp",
                                             "dport": 22})
    assert (r.json()["kept"], r.json()["removed"]) == (1, 1), r.text
    rules = client.get("/api/v1/rules", params={"set": "ssh"}).json()["items"]
    assert [(i["proto"], i["dport"]) for i in rules] == [("tcp", 22)]


def test_a_whole_feed_fits_the_set_limit_but_not_a_single_rule_post(client, fw):
    """PUT /api/v1/sets/{name} takes a body as large as a bulk import (64 MiB), other
    endpoints keep the 1 MiB limit."""
    lines = [f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}  # listed 2024-05-01 by feed X"
             for i in range(40_000)]
    assert len("\n".join(lines)) > 1 << 20
    r = put_set(client, "big", lines)
    assert r.status_code == 200 and r.json()["added"] == 40_000, r.text[:300]
    r = client.post("/api/v1/rules", content=b"x" * (2 << 20),
                    headers={"content-type": "application/json"})
    assert r.status_code == 413, r.text


def test_bulk_delete_in_one_request(client, fw):
    ids = []
    for i in range(0, 1000, 250):
        lines = "\n".join(f"10.1.{j >> 8}.{j & 255}" for j in range(i, i + 250))
        r = client.post("/api/v1/rules/bulk", content=lines, headers=TEXT,
                        params={"comment": f"batch{i}"})
        ids += range(r.json()["first_id"], r.json()["last_id"] + 1)
    before = snapshot(fw)
    r = client.post("/api/v1/rules/delete", json={"ids": [*ids, 424242]})
    assert r.status_code == 404 and "424242" in r.text, r.text
    assert snapshot(fw) == before
    for body, reason in [({}, "exactly one"), ({"ids": [1], "set": "x"}, "exactly one"),
                         ({"set": "../x"}, "set name"), ({"ids": []}, "at least 1")]:
        r = client.post("/api/v1/rules/delete", json=body)
        assert r.status_code == 422 and reason in r.text, (body, r.text)
    r = client.post("/api/v1/rules/delete", json={"comment": "batch0"})
    assert r.json()["removed"] == 250, r.text
    t0 = time.monotonic()
    r = client.post("/api/v1/rules/delete", json={"ids": ids[250:]})
    assert r.status_code == 200 and r.json()["removed"] == 750, r.text
    assert time.monotonic() - t0 < 30  # a bound on a hang, not a speed test
    assert client.get("/api/v1/rules").json()["total"] == 0


def test_skip_existing_makes_a_re_import_succeed(client, fw):
    feed = "192.0.2.1\n192.0.2.2\n"
    assert client.post("/api/v1/rules/bulk", content=feed, headers=TEXT).status_code == 201
    r = client.post("/api/v1/rules/bulk", content=feed, headers=TEXT)
    assert r.status_code == 409, r.text
    r = client.post("/api/v1/rules/bulk", content=feed + "192.0.2.3\n", headers=TEXT,
                    params={"skip_existing": "true"})
    assert r.status_code == 201, r.text
    assert (r.json()["added"], r.json()["skipped"]) == (1, 2)


def test_covering_finds_the_rules_that_contain_an_address(client, fw):
    """What was seen: `rules list --prefix 38.158.13.5` found nothing although
    38.158.13.0/24 covers it. ?covering= lists every rule that contains the address, in the
    order they decide."""
    for body in ({"prefix": "38.158.13.0/24"}, {"prefix": "38.0.0.0/8", "action": "pass"},
                 {"prefix": "38.158.0.0/16", "proto": "tcp", "dport": 22},
                 {"prefix": "38.158.14.0/24"}, {"prefix": "2001:db8::/32"}):
        assert client.post("/api/v1/rules", json=body).status_code == 201
    exact = client.get("/api/v1/rules", params={"prefix": "38.158.13.5"}).json()
    assert exact["total"] == 0
    got = client.get("/api/v1/rules", params={"covering": "38.158.13.5"}).json()["items"]
    assert [i["prefix"] for i in got] == ["38.158.13.0/24", "38.158.0.0/16", "38.0.0.0/8"]
    got = client.get("/api/v1/rules", params={"covering": "38.158.0.0/16"}).json()["items"]
    assert [i["prefix"] for i in got] == ["38.158.0.0/16", "38.0.0.0/8"]
    got = client.get("/api/v1/rules", params={"covering": "2001:db8::1"}).json()["items"]
    assert [i["prefix"] for i in got] == ["2001:db8::/32"]
    r = client.get("/api/v1/rules", params={"covering": "38.158.13.300"})
    assert r.status_code == 422, r.text


def test_every_change_is_audited_with_its_client(fw):
    """What was seen: changes were not logged. Each successful change is kept in the store
    with its client (here TCP clients, told apart by their token's name); reads, refusals
    and dry runs are not changes."""
    app = create_app(fw, token={"ops": "s3cret", "fleet": "f1eet"})
    ops = {"authorization": "Bearer s3cret"}
    fleet = {"authorization": "Bearer f1eet"}
    start = time.time()
    with TestClient(app) as c:  # the session's firewall keeps earlier tests' records
        assert c.put("/api/v1/sets/feed", content="10.0.0.0/8\n", headers=TEXT | ops
                      ).status_code == 200
        assert c.put("/api/v1/sets/feed", content="11.0.0.0/8\n", headers=TEXT | ops,
                     params={"dry_run": "true"}).status_code == 200
        assert c.post("/api/v1/rules", json={"prefix": "12.0.0.0/8"},
                      headers=fleet).status_code == 201
        assert c.post("/api/v1/rules", json={"prefix": "12.0.0.0/8"},
                      headers=fleet).status_code == 409
        assert c.post("/api/v1/rules", json={"prefix": "13.0.0.0/8"}).status_code == 401
        assert c.delete("/api/v1/sets/feed", headers=ops).status_code == 200
        trail = c.get("/api/v1/audit", params={"since": start}, headers=ops).json()
        iso = c.get("/api/v1/audit", headers=ops, params={
            "since": datetime.fromtimestamp(start, UTC).isoformat()}).json()
        later = c.get("/api/v1/audit", params={"since": time.time() + 60}, headers=ops).json()
    got = [(a["client"].split(" (")[0], a["action"], a["detail"]) for a in trail]
    assert got == [
        ("token ops", "PUT /api/v1/sets/feed", "set feed: 1 added, 0 removed, 0 changed, "
                                               "0 kept"),
        ("token fleet", "POST /api/v1/rules", got[1][2]),
        ("token ops", "DELETE /api/v1/sets/feed", "deleted set feed: 1 rules"),
    ], got
    assert got[1][2].startswith("added rule ") and "12.0.0.0/8 drop" in got[1][2]
    assert iso == trail and later == []
    assert [r.action for r in fw.audit.since(start)] == [a["action"] for a in trail]


def test_the_audit_names_the_unix_peer(fw):
    from xdpfw.api.audit import client_of
    from xdpfw.api.peer import STATE_KEY, Peer

    scope = {"state": {STATE_KEY: Peer(pid=4242, uid=0, gid=0)}, "client": None}
    assert client_of(scope) == "uid 0 (pid 4242, unix socket)"
