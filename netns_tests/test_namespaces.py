"""Interfaces with the same ifindex in three namespaces, guarded at once (issue 10).

XDP sees only the ifindex, which repeats in every namespace; each attachment runs its own
instance with its interface slot built in, so each keeps its own policy and counters. This
was refused with 409 before, at the second namespace.
"""

from __future__ import annotations

import pytest

from netns_tests.traffic import ping
from xdpfw import netns as nsutil


@pytest.fixture
def three_pairs(make_netns):
    pairs = []
    for i in range(3):
        cli, srv = make_netns(f"c{i}"), make_netns(f"s{i}")
        nsutil.veth_pair(cli, "cli0", srv, "srv0", (nsutil.Addr(f"10.210.{i}.1", 24),),
                         (nsutil.Addr(f"10.210.{i}.2", 24),))
        pairs.append((cli, srv, f"10.210.{i}.2"))
    return pairs


def test_same_ifindex_in_three_namespaces_each_with_its_own_policy(daemon, three_pairs):
    api = daemon.client()
    ifindexes = {nsutil.ifindex(srv, "srv0") for _, srv, _ in three_pairs}
    assert len(ifindexes) == 1, f"the lab should repeat one ifindex, got {ifindexes}"
    policies = ["pass", "drop", "pass"]
    try:
        for (_, srv, _), policy in zip(three_pairs, policies, strict=True):
            r = api.post("/api/v1/interfaces", json={"name": "srv0", "netns": srv,
                                                     "mode": "generic", "policy": policy})
            assert r.status_code == 201, r.text
        r = api.post("/api/v1/rules", json={"prefix": "10.210.2.1/32", "action": "drop"})
        assert r.status_code == 201, r.text

        def pings() -> list[bool]:
            return [ping(cli, dst).ok for cli, _, dst in three_pairs]

        assert pings() == [True, False, False], "pass policy / drop policy / a drop rule"
        counters = {i["netns"]: i for i in api.get("/api/v1/stats").json()["interfaces"]}
        assert counters[three_pairs[0][1]]["dropped"]["packets"] == 0, counters
        assert counters[three_pairs[1][1]]["dropped"]["packets"] > 0, counters
        assert counters[three_pairs[0][1]]["passed"]["packets"] > 0, counters

        # Detaching the second leaves the other two guarded.
        r = api.delete("/api/v1/interfaces/srv0", params={"netns": three_pairs[1][1]})
        assert r.status_code == 200, r.text
        assert pings() == [True, True, False]
        listed = {(i["netns"], i["slot"]) for i in api.get("/api/v1/interfaces").json()}
        assert {ns for ns, _ in listed} == {three_pairs[0][1], three_pairs[2][1]}
        assert len({slot for _, slot in listed}) == 2
    finally:
        for _, srv, _ in three_pairs:
            api.delete("/api/v1/interfaces/srv0", params={"netns": srv})
        for rule in api.get("/api/v1/rules").json()["items"]:
            api.delete(f"/api/v1/rules/{rule['id']}")
