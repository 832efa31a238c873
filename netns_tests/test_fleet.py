"""A fleet with a real etcd: three appliances (three daemons, each guarding a veth in
namespaces of its own, own state and pins) and a three-member etcd cluster on loopback.

The tests share one lab and run in order; each leaves the cluster running and healthy.
"""

from __future__ import annotations

import base64
import json
import socket
import subprocess
import threading
import time

import httpx
import numpy as np
import pytest

from netns_tests.conftest import XDPFW
from netns_tests.fleet_lab import EtcdCluster, FleetLab, pinned_v4_verdicts
from netns_tests.traffic import ping
from xdpfw.netns import wait_until

CONVERGE_S = 5.0  # generous: scripts/bench_fleet.py measures the real figure


def b64(s: str | bytes) -> str:
    return base64.b64encode(s.encode() if isinstance(s, str) else s).decode()


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    work = tmp_path_factory.mktemp("fleet")
    cluster = EtcdCluster(work)
    lab = FleetLab(work, cluster)
    try:
        cluster.start()
        lab.add_nodes(3, max_rules=1 << 21)  # room for a million-prefix set replaced
        yield lab
    finally:
        lab.close()


def _drop_client_icmp(lab: FleetLab, via: int = 0) -> dict:
    p = lab.nodes[via].pair
    r = lab.nodes[via].client().post("/api/v1/rules", json={
        "prefix": f"{p.client4}/32", "action": "drop", "proto": "icmp", "comment": "fleet"})
    assert r.status_code == 201, r.text
    return r.json()


def _all_dropped(lab: FleetLab, timeout: float = CONVERGE_S) -> None:
    for n in lab.nodes:
        ok = wait_until(lambda n=n: not ping(n.pair.client, n.pair.server4, 1, 0.3).ok,
                        timeout)
        assert ok, f"{n.name} still answers pings: {ping(n.pair.client, n.pair.server4)}"


def _all_pass(lab: FleetLab, timeout: float = CONVERGE_S) -> None:
    for n in lab.nodes:
        ok = wait_until(lambda n=n: ping(n.pair.client, n.pair.server4, 1, 0.5).ok, timeout)
        assert ok, f"{n.name} drops pings: {ping(n.pair.client, n.pair.server4)}"


def _delete_everywhere(lab: FleetLab, rule_id: int) -> None:
    r = lab.nodes[1].client().delete(f"/api/v1/rules/{rule_id}")
    assert r.status_code == 200, r.text


def test_a_rule_added_through_one_node_drops_at_every_node(lab):
    _all_pass(lab)
    rule = _drop_client_icmp(lab)
    _all_dropped(lab)
    revision = lab.wait_converged()
    for n in lab.nodes:  # one id for the rule, on every node
        got = n.client().get(f"/api/v1/rules/{rule['id']}")
        assert got.status_code == 200 and got.json()["prefix"] == rule["prefix"], got.text
        status = lab.own_status(n)
        assert status["health"] == "ok" and status["lag"] == 0, status
    cli = subprocess.run([*XDPFW, "fleet", "status", "--socket", lab.nodes[2].daemon.socket],
                         capture_output=True, text=True, timeout=30)
    assert cli.returncode == 0, cli.stdout + cli.stderr
    for n in lab.nodes:
        row = next(line.split() for line in cli.stdout.splitlines() if line.startswith(n.name))
        assert row[1:6] == [str(revision), "0", "1", "0", "ok"], cli.stdout
    _delete_everywhere(lab, rule["id"])  # through another node
    _all_pass(lab)
    assert lab.wait_converged() > revision


def test_two_nodes_writing_the_same_rule_one_wins(lab):
    for k in range(5):
        body = {"prefix": f"198.51.100.{k}/32", "action": "drop"}
        start = threading.Barrier(2)
        answers: list[httpx.Response] = []

        def write(node, body=body, start=start, answers=answers):
            with node.client() as c:
                start.wait()
                answers.append(c.post("/api/v1/rules", json=body))

        threads = [threading.Thread(target=write, args=(n,)) for n in lab.nodes[:2]]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        codes = sorted(a.status_code for a in answers)
        assert codes == [201, 409], [a.text for a in answers]
        loser = next(a for a in answers if a.status_code == 409)
        assert "exists already" in loser.json()["detail"], loser.text
    lab.wait_converged()
    for n in lab.nodes:
        rules = n.client().get("/api/v1/rules", params={"prefix": "198.51.100.0/32"}).json()
        assert rules["total"] == 1, (n.name, rules)


def test_a_garbage_key_is_refused_alone(lab):
    """A hand-written key that is not a rule must not crash a node nor hold back the valid
    change beside it in the same transaction; the nodes name it in their status."""
    rules = lab.prefix + "data/rules/"
    good = f"{rules}203.0.113.0/24|any|0"
    lab.etcd.call("kv/txn", {"success": [
        {"request_put": {"key": b64(f"{rules}203.0.113.7/32|any|0"), "value": b64("{not json")}},
        {"request_put": {"key": b64(f"{rules}junk"), "value": b64("x" * 100_000)}},
        {"request_put": {"key": b64(f"{rules}192.0.2.0/24|any|0"), "value": b64(
            '{"id": 900001, "prefix": "198.18.0.0/24", "action": "drop"}')}},
        {"request_put": {"key": b64(good), "value": b64(
            '{"id": 900002, "prefix": "203.0.113.0/24", "action": "drop", "comment": "x"}')}},
    ]})
    for n in lab.nodes:
        assert wait_until(lambda n=n: lab.own_status(n)["refused_keys"] == 3, CONVERGE_S), \
            lab.own_status(n)
        status = lab.own_status(n)
        assert status["health"] == "degraded" and status["last_error"], status
        assert n.client().get("/api/v1/rules/900002").status_code == 200
        assert n.client().get("/api/v1/rules/900001").status_code == 404
    for key in ("203.0.113.7/32|any|0", "junk", "192.0.2.0/24|any|0", "203.0.113.0/24|any|0"):
        lab.etcd.call("kv/deleterange", {"key": b64(rules + key)})
    for n in lab.nodes:
        assert wait_until(lambda n=n: lab.own_status(n)["health"] == "ok", CONVERGE_S), \
            lab.own_status(n)
        assert n.client().get("/api/v1/rules/900002").status_code == 404


def _services(node) -> dict:
    r = node.client().get("/api/v1/services")
    assert r.status_code == 200, r.text
    return {s["id"]: (s["vip"], s["port"], [(b["id"], b["address"], b["state"])
                                            for b in s["backends"]]) for s in r.json()}


def _same_services_everywhere(lab, want: dict) -> None:
    for n in lab.nodes:
        ok = wait_until(lambda n=n: _services(n) == want, CONVERGE_S)
        assert ok, (n.name, _services(n), want)


def test_a_service_written_through_any_node_is_the_same_on_every_node(lab):
    """Created through node 1, drained through node 2, deleted through node 3: every node
    shows it with one id and the same backends (their MACs are each node's own)."""
    n1, n2, n3 = lab.nodes
    r = n1.client().post("/api/v1/services", json={
        "vip": "10.96.0.10", "port": 80, "backends": [{"address": "10.96.1.1"},
                                                      {"address": "10.96.1.2"}]})
    assert r.status_code == 201, r.text
    sid, (b1, b2) = r.json()["id"], [b["id"] for b in r.json()["backends"]]
    want = {sid: ("10.96.0.10", 80, [(b1, "10.96.1.1", "active"),
                                     (b2, "10.96.1.2", "active")])}
    _same_services_everywhere(lab, want)
    for n in lab.nodes:  # and each node's status in the fleet view counts it
        assert wait_until(lambda n=n: lab.own_status(n)["services"] == 1, CONVERGE_S), \
            lab.own_status(n)
    r = n2.client().patch(f"/api/v1/services/{sid}/backends/{b1}", json={"state": "draining"})
    assert r.status_code == 200 and r.json()["state"] == "draining", r.text
    want[sid][2][0] = (b1, "10.96.1.1", "draining")
    _same_services_everywhere(lab, want)
    # Two nodes add one backend at once: one wins, the other gets a 409.
    start, answers = threading.Barrier(2), []

    def add(node):
        with node.client() as c:
            start.wait()
            answers.append(c.post(f"/api/v1/services/{sid}/backends",
                                  json={"address": "10.96.1.3"}))

    threads = [threading.Thread(target=add, args=(n,)) for n in (n1, n2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(a.status_code for a in answers) == [201, 409], [a.text for a in answers]
    b3 = next(a.json()["id"] for a in answers if a.status_code == 201)
    want[sid][2].append((b3, "10.96.1.3", "active"))
    _same_services_everywhere(lab, want)
    # A hand-written service key no node can apply is refused alone.
    garbage = lab.prefix + "data/services/77"
    lab.etcd.call("kv/put", {"key": b64(garbage), "value": b64('{"id": 77, "port": 0}')})
    for n in lab.nodes:
        assert wait_until(lambda n=n: lab.own_status(n)["refused_keys"] == 1, CONVERGE_S), \
            lab.own_status(n)
    lab.etcd.call("kv/deleterange", {"key": b64(garbage)})
    r = n3.client().delete(f"/api/v1/services/{sid}")
    assert r.status_code == 200 and r.json()["id"] == sid, r.text
    _same_services_everywhere(lab, {})
    for n in lab.nodes:
        assert wait_until(lambda n=n: lab.own_status(n)["health"] == "ok"
                          and lab.own_status(n)["services"] == 0, CONVERGE_S), \
            lab.own_status(n)
    lab.wait_converged()


def test_one_member_stopped_writes_still_succeed(lab):
    first = lab.etcd.members[0]  # every node's first endpoint
    lab.etcd.stop_member(first)
    try:
        rule = _drop_client_icmp(lab, via=2)
        _all_dropped(lab)
        _delete_everywhere(lab, rule["id"])
        _all_pass(lab)
        lab.wait_converged()
    finally:
        lab.etcd.start_member(first)


def test_etcd_away_nodes_keep_enforcing_and_refuse_writes(lab):
    rule = _drop_client_icmp(lab)
    _all_dropped(lab)
    lab.wait_converged()
    lab.etcd.stop()
    try:
        for n in lab.nodes:
            assert wait_until(
                lambda n=n: lab.own_status(n)["health"] == "etcd-unreachable", 10), \
                lab.own_status(n)
        _all_dropped(lab, timeout=1)  # still guarding
        for n in lab.nodes:
            r = n.client().post("/api/v1/rules", json={"prefix": "192.0.2.99", "action": "drop"})
            assert r.status_code == 503, r.text
            assert "etcd is unreachable" in r.json()["detail"], r.text
            assert n.client().get(f"/api/v1/rules/{rule['id']}").status_code == 200
            view = lab.fleet(n)
            assert view["etcd"]["reachable"] is False, view
        # A node restarted while etcd is away comes back guarding with what it applied.
        third = lab.nodes[2]
        third.daemon.stop()
        third.daemon.start(timeout=120)
        assert third.client().get(f"/api/v1/rules/{rule['id']}").status_code == 200
        assert not ping(third.pair.client, third.pair.server4, 2, 0.5).ok
    finally:
        lab.etcd.start()
    revision = lab.wait_converged(timeout=30)
    for n in lab.nodes:
        assert lab.own_status(n)["applied_revision"] == revision
    _delete_everywhere(lab, rule["id"])
    _all_pass(lab)


def test_a_node_back_after_compaction_resyncs_the_difference(lab):
    """A node that was away while the history it needed was compacted reads a snapshot and
    applies only what differs."""
    third = lab.nodes[2]
    third.daemon.stop()
    keep = lab.nodes[0].client().post("/api/v1/rules", json={"prefix": "192.0.2.10",
                                                            "action": "drop"}).json()
    gone = lab.nodes[0].client().post("/api/v1/rules", json={"prefix": "192.0.2.11",
                                                            "action": "drop"}).json()
    _delete_everywhere(lab, gone["id"])
    revision = lab.etcd.call("kv/range", {"key": b64("x")})["header"]["revision"]
    lab.etcd.call("kv/compaction", {"revision": revision, "physical": True})
    third.daemon.start(timeout=120)
    lab.wait_converged(timeout=15)
    status = lab.own_status(third)
    assert status["resyncs"] >= 1, status
    assert third.client().get(f"/api/v1/rules/{keep['id']}").status_code == 200
    assert third.client().get(f"/api/v1/rules/{gone['id']}").status_code == 404
    _delete_everywhere(lab, keep["id"])
    lab.wait_converged()


def _hosts(n: int, seed: int) -> list[str]:
    """n random IPv4 host addresses, none in the pairs' 10.201.0.0/24."""
    rng = np.random.default_rng(seed)
    addrs = np.unique(rng.integers(1 << 24, 224 << 24, n + n // 8, dtype=np.uint64))
    addrs = addrs[(addrs >> np.uint64(8)) != np.uint64(0x0AC900)]
    rng.shuffle(addrs)
    return [socket.inet_ntoa(int(a).to_bytes(4, "big")) for a in addrs[:n]]


def _put_set(node, name: str, lines: list[str], timeout: float = 120) -> dict:
    r = node.client().put(f"/api/v1/fleet/sets/{name}", content="\n".join(lines).encode(),
                          headers={"content-type": "text/plain"},
                          params={"comment": f"set {name}"}, timeout=timeout)
    assert r.status_code == 200, r.text
    return r.json()


def _set_size(node, name: str) -> int:
    return node.client().get("/api/v1/rules", params={"comment": f"set {name}",
                                                      "limit": 1}).json()["total"]


def test_a_set_reaches_every_node_and_a_change_moves_one_chunk(lab):
    client = lab.nodes[0].pair.client4
    members = [*_hosts(50_000, seed=5), client]
    first = _put_set(lab.nodes[1], "feed", members)
    assert first["count"] == len(members) and first["applied_here"], first
    lab.wait_converged(timeout=30)
    _all_dropped(lab)
    for n in lab.nodes:
        assert _set_size(n, "feed") == len(members)
    # A set member is the set's to remove, not DELETE's.
    some = lab.nodes[2].client().get("/api/v1/rules", params={"comment": "set feed",
                                                               "limit": 1}).json()
    r = lab.nodes[2].client().delete(f"/api/v1/rules/{some['items'][0]['id']}")
    assert r.status_code == 409 and "belongs to fleet set feed" in r.text, r.text
    # One prefix out: one chunk written, the rest kept (with their ids). Through the CLI's
    # `sets replace`, which on a fleet node writes the fleet set.
    feed = lab.workdir / "feed.txt"
    feed.write_text("\n".join(members[:-1]) + "\n")
    cli = subprocess.run([*XDPFW, "sets", "replace", "feed", str(feed), "--comment", "set feed",
                          "--json", "--socket", lab.nodes[0].daemon.socket],
                         capture_output=True, text=True, timeout=60)
    assert cli.returncode == 0, cli.stdout + cli.stderr
    second = json.loads(cli.stdout)
    assert second["chunks_written"] == 1 and second["chunks_kept"] == second["chunks"] - 1, \
        (first, second)
    lab.wait_converged(timeout=30)
    _all_pass(lab)
    # A manifest written by hand that no writer makes is refused; the set stays as it was.
    key = lab.prefix + "data/sets/feed"
    lab.etcd.call("kv/put", {"key": b64(key), "value": b64('{"action": "drop"}')})
    for n in lab.nodes:
        assert wait_until(lambda n=n: lab.own_status(n)["refused_keys"] == 1, CONVERGE_S), \
            lab.own_status(n)
        assert _set_size(n, "feed") == len(members) - 1
    cli = subprocess.run([*XDPFW, "sets", "delete", "feed", "--socket",
                          lab.nodes[2].daemon.socket], capture_output=True, text=True, timeout=60)
    assert cli.returncode == 0, cli.stdout + cli.stderr
    assert cli.stdout.startswith("deleted set feed: written to the fleet at etcd revision "), \
        cli.stdout
    lab.wait_converged(timeout=30)
    for n in lab.nodes:
        assert _set_size(n, "feed") == 0
        assert lab.own_status(n)["health"] == "ok", lab.own_status(n)


def test_a_million_prefix_set_replaced_through_any_node_reaches_all_within_10s(lab):
    hosts = _hosts(1_500_000, seed=1)
    a, b = hosts[:1_000_000], hosts[500_000:]  # sharing half
    _put_set(lab.nodes[0], "big", a)
    lab.wait_converged(timeout=60)
    start = time.monotonic()
    replaced = _put_set(lab.nodes[2], "big", b)
    revision = lab.wait_converged(timeout=60)
    took = time.monotonic() - start
    assert revision >= replaced["revision"]
    assert took <= 10.0, f"a 1M-prefix set replaced in {took:.1f} s: {replaced}"
    # The maps of every node hold the new set: its members drop, the old half passes.
    sample_in, sample_out = b[::997], a[:500_000:997]
    for n in lab.nodes:
        assert _set_size(n, "big") == 1_000_000
        verdicts = pinned_v4_verdicts(n.daemon.pin_dir, sample_in + sample_out)
        assert all(verdicts[:len(sample_in)]), f"{n.name}: a member is not in the maps"
        assert not any(verdicts[len(sample_in):]), f"{n.name}: an old member is still there"
    r = lab.nodes[1].client().delete("/api/v1/fleet/sets/big")
    assert r.status_code == 200, r.text
    lab.wait_converged(timeout=60)
