"""The REST API on a real Firewall (real maps): status codes, reasons, and no change on error."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from xdpfw.api.app import create_app
from xdpfw.rules.model import parse_prefix

pytestmark = pytest.mark.bpf


@pytest.fixture
def client(fw):
    with TestClient(create_app(fw)) as c:
        yield c


def snapshot(fw):
    """What a bad request must leave untouched: the store, the index and the kernel maps."""
    return (
        sorted(str(r) for r in fw.store.load_rules()),
        dict(fw.index.prefix_values),
        sorted(fw.maps.prefix_keys()),
        sorted(fw.maps.port_keys()),
    )


def test_add_get_list_delete(client, fw):
    r = client.post("/api/v1/rules", json={
        "prefix": "203.0.113.0/24", "action": "drop", "proto": "tcp", "dport": 22,
        "comment": "ssh scanners",
    })
    assert r.status_code == 201, r.text
    rule = r.json()
    assert rule["prefix"] == "203.0.113.0/24" and rule["dport"] == 22 and rule["id"] > 0
    assert parse_prefix("203.0.113.0/24") in fw.maps.prefix_keys(), "not written to the trie"

    assert client.get(f"/api/v1/rules/{rule['id']}").json()["comment"] == "ssh scanners"
    client.post("/api/v1/rules", json={"prefix": "2001:db8::/32", "action": "allow"})
    page = client.get("/api/v1/rules", params={"action": "pass"}).json()
    assert page["total"] == 1 and page["items"][0]["prefix"] == "2001:db8::/32"
    assert client.get("/api/v1/rules", params={"limit": 1}).json()["total"] == 2

    assert client.delete(f"/api/v1/rules/{rule['id']}").status_code == 200
    assert client.get(f"/api/v1/rules/{rule['id']}").status_code == 404
    assert parse_prefix("203.0.113.0/24") not in fw.maps.prefix_keys()


@pytest.mark.parametrize(
    ("body", "status", "reason"),
    [
        ({"prefix": "10.0.0.300/8"}, 422, "not an IPv4 address"),
        ({"prefix": "10.0.0.1/8"}, 422, "host bits set"),
        ({"prefix": "10.0.0.0/8", "dport": 22}, 422, "needs a protocol"),
        ({"prefix": "10.0.0.0/8", "proto": "icmp", "dport": 1}, 422, "has no ports"),
        ({"prefix": "10.0.0.0/8", "action": "reject"}, 422, "action"),
        ({"prefix": "10.0.0.0/8", "colour": "red"}, 422, "colour"),
        ({"prefix": "192.0.2.0/24"}, 409, "exists already"),
    ],
)
def test_bad_input_is_refused_with_a_reason_and_changes_nothing(client, fw, body, status, reason):
    assert client.post("/api/v1/rules", json={"prefix": "192.0.2.0/24"}).status_code == 201
    before = snapshot(fw)
    r = client.post("/api/v1/rules", json=body)
    assert r.status_code == status, r.text
    assert reason in r.text, r.text
    assert snapshot(fw) == before


def test_bulk_text_json_and_all_or_nothing(client, fw):
    text = "# feed\n198.51.100.0/24\n203.0.113.7\n2001:db8:bad::/48\n"
    r = client.post("/api/v1/rules/bulk", content=text, headers={"content-type": "text/plain"})
    assert r.status_code == 201, r.text
    assert r.json()["added"] == 3
    r = client.post("/api/v1/rules/bulk", json={"prefixes": ["10.0.0.0/8", "11.0.0.0/8"],
                                                 "action": "pass", "comment": "partners"})
    assert r.status_code == 201, r.text
    r = client.post("/api/v1/rules/bulk", json={"rules": [
        {"prefix": "12.0.0.0/8", "proto": "udp", "dport": 53}]})
    assert r.status_code == 201, r.text
    assert len(fw.table) == 6

    before = snapshot(fw)
    bad = "13.0.0.0/8\n14.0.0.0/8\n15.0.0.1/8\n"
    r = client.post("/api/v1/rules/bulk", content=bad, headers={"content-type": "text/plain"})
    assert r.status_code == 422 and "line 3" in r.text, r.text
    r = client.post("/api/v1/rules/bulk", json={"prefixes": ["16.0.0.0/8", "198.51.100.0/24"]})
    assert r.status_code == 409 and "198.51.100.0/24" in r.text, r.text
    r = client.post("/api/v1/rules/bulk", json={"prefixes": ["17.0.0.0/8", "17.0.0.0/8"]})
    assert r.status_code == 409 and "twice" in r.text, r.text
    assert snapshot(fw) == before


def test_unknown_interface_and_rule(client, fw):
    r = client.post("/api/v1/interfaces", json={"name": "nosuchif0"})
    assert r.status_code == 404 and "unknown interface nosuchif0" in r.text, r.text
    assert client.delete("/api/v1/interfaces/nosuchif0").status_code == 404
    assert client.delete("/api/v1/rules/999999").status_code == 404
    assert client.get("/api/v1/interfaces").json() == []


def test_stats_and_health(client, fw):
    assert client.get("/healthz").json()["status"] == "ok"
    stats = client.get("/api/v1/stats").json()
    assert set(stats) == {"actions", "interfaces", "rules"}
    assert "rule_drop" in stats["actions"]


def test_openapi_is_served(client):
    spec = client.get("/openapi.json").json()
    assert "/api/v1/rules/bulk" in spec["paths"] and "/api/v1/interfaces" in spec["paths"]


def test_tcp_clients_need_the_token(fw):
    with TestClient(create_app(fw, token="s3cret")) as c:  # TestClient looks like a TCP client
        assert c.get("/api/v1/rules").status_code == 401
        ok = c.get("/api/v1/rules", headers={"authorization": "Bearer s3cret"})
        assert ok.status_code == 200


def test_bulk_failing_midway_undoes_chunks_already_in_the_kernel(fw, monkeypatch):
    """A chunk failing after earlier ones were written (here: the store) leaves no trace of
    them, for plain prefixes (written from columns) and for port rules (compiled)."""
    import sqlite3

    from xdpfw import service
    from xdpfw.errors import ConflictError
    from xdpfw.rules.model import Action, Proto
    from xdpfw.rules.table import Prefixes
    from xdpfw.service import RuleSpec

    fw.add_rules([RuleSpec(parse_prefix("192.0.2.0/24"), Action.DROP)])
    before = snapshot(fw)
    monkeypatch.setattr(service, "ADD_CHUNK", 2)
    real, calls = fw.store.insert_table_rows, []

    def third_fails(table, rows):
        calls.append(len(rows))
        if len(calls) % 3 == 0:
            raise sqlite3.OperationalError("disk I/O error")
        real(table, rows)

    monkeypatch.setattr(fw.store, "insert_table_rows", third_fails)
    texts = ["10.0.0.0/8", "11.0.0.0/8", "2001:db8::/32", "12.0.0.0/8", "13.0.0.7", "14.0.0.0/8"]
    prefixes = [parse_prefix(t) for t in texts]
    with pytest.raises(sqlite3.OperationalError):
        fw.add_prefixes(Prefixes.of(prefixes), Action.DROP)
    assert snapshot(fw) == before, "a chunk written before the failure stayed"
    with pytest.raises(sqlite3.OperationalError):
        fw.add_rules([RuleSpec(p, Action.PASS, Proto.TCP, 22) for p in prefixes])
    assert snapshot(fw) == before, "a compiled chunk written before the failure stayed"
    monkeypatch.setattr(fw.store, "insert_table_rows", real)

    three = Prefixes.of(prefixes[:3])
    with pytest.raises(ConflictError, match=r"10\.0\.0\.0/8 appears twice in this request"):
        fw.add_prefixes(Prefixes.of([*prefixes[:3], prefixes[0]]), Action.DROP)
    with pytest.raises(ConflictError, match=r"192.0.2.0/24 exists already \(id"):
        fw.add_prefixes(Prefixes.of([*prefixes[:3], parse_prefix("192.0.2.0/24")]),
                        Action.DROP)
    assert snapshot(fw) == before
    ids = fw.add_prefixes(three, Action.DROP, "feed")
    assert [(str(fw.get_rule(i).prefix), fw.get_rule(i).comment) for i in ids] == [
        (t, "feed") for t in texts[:3]]
    assert {str(r.prefix) for r in fw.store.load_rules()} >= set(texts[:3])
    assert parse_prefix("2001:db8::/32") in fw.maps.prefix_keys()


def test_empty_blocklist_is_refused(client, fw):
    r = client.post("/api/v1/rules/bulk", content="# nothing\n\n",
                    headers={"content-type": "text/plain"})
    assert r.status_code == 422 and "no prefix" in r.text, r.text


def test_blocklists_written_from_columns_equal_what_the_compiler_says(fw, run):
    """add_plain (one action, no port rules: IPv4 through numpy) writes what compiling the
    same rules one by one would: the kernel's verdict of every address is the index's."""
    from tests import packets as P
    from xdpfw.dataplane.v4table import pack_verdict
    from xdpfw.rules.model import V4, Action

    v4 = [parse_prefix(t) for t in ("10.0.0.7", "10.1.0.0/16", "192.0.2.9", "198.51.100.0/24")]
    mixed = [*v4, parse_prefix("2001:db8::1"), parse_prefix("2001:db8:1::/48")]
    from xdpfw.rules.table import Prefixes

    fw.add_prefixes(Prefixes.of(mixed), Action.DROP)
    assert sorted(fw.maps.prefix_keys()) == sorted(fw.index.prefix_values)
    for src, want in (("10.0.0.7", "XDP_DROP"), ("10.1.2.3", "XDP_DROP"), ("10.0.0.8", "XDP_PASS")):
        assert run(P.tcp4(src, 80)).verdict == want, src
    assert run(P.tcp6("2001:db8:1::5", 80)).verdict == "XDP_DROP"
    for p, value in fw.index.prefix_values.items():
        if p.family == V4:
            assert fw.maps.v4_verdict(p.net) == pack_verdict(*value), p


def test_bulk_refuses_what_it_cannot_read(client, fw):
    before = snapshot(fw)
    r = client.post("/api/v1/rules/bulk", content=b"10.0.0.0/8\n\xff\xfe\n",
                    headers={"content-type": "text/plain"})
    assert r.status_code == 422 and "not UTF-8" in r.text, r.text
    r = client.post("/api/v1/rules/bulk", content=b"<x/>",
                    headers={"content-type": "application/xml"})
    assert r.status_code == 415 and "text/plain" in r.text, r.text
    assert snapshot(fw) == before


def test_an_unknown_netns_is_a_404_and_is_not_created(client, fw):
    import uuid

    from xdpfw.netns import list_netns

    name = f"xdpfw-nosuch-{uuid.uuid4().hex[:6]}"
    r = client.post("/api/v1/interfaces", json={"name": "eth0", "netns": name})
    assert r.status_code == 404 and f"no network namespace '{name}'" in r.text, r.text
    assert name not in list_netns(), "a request for a mistyped netns created it"
