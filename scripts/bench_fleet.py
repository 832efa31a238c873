#!/usr/bin/env python3
"""Fleet convergence: how long a rule written through one appliance takes to be enforced by
every appliance of a three-node fleet (three-member etcd on loopback, three daemons each
guarding a veth in namespaces of their own: netns_tests/fleet_lab.py).

Each change is a POST (or DELETE) through node 1; the clock starts before the request and
stops, per node, when that node answers GET /api/v1/rules/{id} with the rule present (or
gone). The Firewall answers that only once the rule's map writes are done (it holds its
lock through add and delete), so the figure is "in the maps". At the end, a ping from each
client namespace shows the last rule dropping packets at every node.

Then a set of --set-size random IPv4 hosts (a million) is written through node 1 and
replaced through node 3 by one sharing half: seconds until every node has applied it.

    .venv/bin/python scripts/bench_fleet.py --changes 100      # as root, about two minutes
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from netns_tests.fleet_lab import EtcdCluster, FleetLab
from netns_tests.traffic import ping

POLL_S = 0.002


def wait_state(node, rule_id: int, present: bool, start: float, out: dict, name: str) -> None:
    with node.client() as c:
        while time.perf_counter() - start < 30:
            code = c.get(f"/api/v1/rules/{rule_id}").status_code
            if (code == 200) == present:
                out[name] = time.perf_counter() - start
                return
            time.sleep(POLL_S)
    out[name] = float("inf")


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(p / 100 * len(s)) - 1))]


def replace_set(lab: FleetLab, size: int) -> dict:
    """A set of `size` random IPv4 hosts through node 1, then replaced through node 3 by one
    sharing half: seconds until every node has applied it (its maps written)."""
    rng = np.random.default_rng(1)
    addrs = np.unique(rng.integers(1 << 24, 224 << 24, size * 2, dtype=np.uint64))
    addrs = addrs[(addrs >> np.uint64(8)) != np.uint64(0x0AC900)]  # not the pairs' /24
    rng.shuffle(addrs)
    text = [socket.inet_ntoa(int(a).to_bytes(4, "big")) for a in addrs[: size + size // 2]]
    timings = {}
    for label, node, lines in (("create", lab.nodes[0], text[:size]),
                               ("replace", lab.nodes[2], text[size // 2:])):
        start = time.perf_counter()
        r = node.client().put("/api/v1/fleet/sets/bench", content="\n".join(lines).encode(),
                              headers={"content-type": "text/plain"}, timeout=120)
        assert r.status_code == 200, r.text
        answered = time.perf_counter() - start
        lab.wait_converged(timeout=120)
        timings[label] = {"answer_s": round(answered, 2),
                          "all_nodes_s": round(time.perf_counter() - start, 2),
                          "chunks": r.json()["chunks"],
                          "chunks_written": r.json()["chunks_written"]}
    return {"size": size, "shared": size // 2, **timings}


def run(changes: int, set_size: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="xdpfw-bench-fleet-") as tmp:
        work = Path(tmp)
        lab = FleetLab(work, EtcdCluster(work))
        try:
            lab.etcd.start()
            lab.add_nodes(3, max_rules=1 << 21)
            writer = lab.nodes[0].client()
            per_node: dict[str, list[float]] = {n.name: [] for n in lab.nodes}
            answered, slowest = [], []
            rule_id = None
            for k in range(changes):
                start = time.perf_counter()
                if rule_id is None:  # add, then delete, alternately
                    r = writer.post("/api/v1/rules", json={
                        "prefix": lab.nodes[0].pair.client4, "action": "drop",
                        "proto": "icmp", "comment": f"bench {k}"})
                    assert r.status_code == 201, r.text
                    rid, present = r.json()["id"], True
                else:
                    r = writer.delete(f"/api/v1/rules/{rule_id}")
                    assert r.status_code == 200, r.text
                    rid, present = rule_id, False
                answered.append(time.perf_counter() - start)
                seen: dict[str, float] = {}
                threads = [threading.Thread(target=wait_state,
                                            args=(n, rid, present, start, seen, n.name))
                           for n in lab.nodes]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                for name, s in seen.items():
                    per_node[name].append(s)
                slowest.append(max(seen.values()))
                rule_id = rid if present else None
            if rule_id is None:  # end on a drop rule, and show it drops everywhere
                r = writer.post("/api/v1/rules", json={
                    "prefix": lab.nodes[0].pair.client4, "action": "drop", "proto": "icmp"})
                assert r.status_code == 201, r.text
                lab.wait_converged()
            pings = {n.name: not ping(n.pair.client, n.pair.server4, 2, 0.5).ok
                     for n in lab.nodes}
            set_replace = replace_set(lab, set_size) if set_size else None
            ms = lambda v: round(v * 1000, 2)  # noqa: E731
            return {
                "phase": "fleet-convergence", "changes": changes, "nodes": len(lab.nodes),
                "etcd_members": len(lab.etcd.members),
                "answer_ms": {"p50": ms(statistics.median(answered)),
                              "p99": ms(pct(answered, 99))},
                "all_nodes_ms": {"p50": ms(statistics.median(slowest)),
                                 "p99": ms(pct(slowest, 99)), "max": ms(max(slowest))},
                "per_node_p99_ms": {k: ms(pct(v, 99)) for k, v in per_node.items()},
                "last_rule_drops_pings": pings,
                "set_replace": set_replace,
            }
        finally:
            lab.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--changes", type=int, default=100)
    ap.add_argument("--set-size", type=int, default=1_000_000,
                    help="then a set this large, replaced by one sharing half (0: skip)")
    ap.add_argument("--out", help="append the result as a JSON line to this file")
    args = ap.parse_args()
    result = run(args.changes, args.set_size)
    line = json.dumps(result)
    print(line)
    if args.out:
        with open(args.out, "a") as f:
            f.write(line + "\n")
    slow_set = result["set_replace"] and result["set_replace"]["replace"]["all_nodes_s"] > 10
    return 0 if result["all_nodes_ms"]["p99"] <= 1000 and not slow_set else 1


if __name__ == "__main__":
    sys.exit(main())
