"""A fleet lab: an etcd cluster on loopback ports and xdpfw daemons, each guarding the server
end of a veth pair in namespaces of its own. Used by netns_tests/test_fleet.py and
scripts/bench_fleet.py.

Every member's data dir is under the lab's work dir; ports are picked free at run time;
close() stops every process the lab started (by its own handle) and removes namespaces and
pins.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from netns_tests.conftest import Daemon, Pair, free_port, new_pin_dir, terminate
from xdpfw import netns as nsutil

ETCD = shutil.which("etcd") or "/usr/bin/etcd"


@dataclass
class Member:
    name: str
    client_port: int
    peer_port: int
    data_dir: Path
    log: Path
    proc: subprocess.Popen | None = None

    @property
    def client_url(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"


class EtcdCluster:
    def __init__(self, workdir: Path, size: int = 3) -> None:
        if not Path(ETCD).exists():
            raise RuntimeError("etcd is not installed: run scripts/setup.sh (etcd-server)")
        self.workdir = workdir
        self.token = f"xdpfw-{uuid.uuid4().hex[:8]}"
        self.members = [Member(f"m{i}", free_port(), free_port(), workdir / f"etcd-m{i}",
                               workdir / f"etcd-m{i}.log") for i in range(size)]

    @property
    def endpoints(self) -> list[str]:
        return [m.client_url for m in self.members]

    def start(self, timeout: float = 30.0) -> None:
        for m in self.members:
            self.start_member(m, wait=False)
        self.wait_healthy(timeout)

    def start_member(self, m: Member, wait: bool = True) -> None:
        cluster = ",".join(f"{x.name}={x.peer_url}" for x in self.members)
        argv = [ETCD, "--name", m.name, "--data-dir", str(m.data_dir),
                "--listen-client-urls", m.client_url, "--advertise-client-urls", m.client_url,
                "--listen-peer-urls", m.peer_url, "--initial-advertise-peer-urls", m.peer_url,
                "--initial-cluster", cluster, "--initial-cluster-token", self.token,
                "--initial-cluster-state", "new",
                # Loopback: elect fast, so a stopped member costs the tests little time.
                "--heartbeat-interval", "50", "--election-timeout", "500"]
        with open(m.log, "a") as out:
            m.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
        if wait:
            self.wait_healthy()

    def stop_member(self, m: Member) -> None:
        terminate(m.proc, 10)
        m.proc = None

    def stop(self) -> None:
        for m in self.members:
            self.stop_member(m)

    def running(self) -> list[Member]:
        return [m for m in self.members if m.proc is not None and m.proc.poll() is None]

    def wait_healthy(self, timeout: float = 30.0) -> None:
        """Until a write through a running member commits (the cluster has a leader)."""
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            for m in self.running():
                try:
                    r = httpx.post(f"{m.client_url}/v3/kv/put", timeout=2,
                                   json={"key": "aGVhbHRo", "value": "b2s="})
                    if r.status_code == 200:
                        return
                    last = r.text
                except httpx.TransportError as e:
                    last = str(e)
            time.sleep(0.1)
        raise RuntimeError(f"etcd did not become healthy: {last}\n{self.logs()}")

    def call(self, path: str, body: dict) -> dict:
        """A raw etcd request through any running member (tests write keys by hand)."""
        for m in self.running():
            with contextlib.suppress(httpx.TransportError):
                r = httpx.post(f"{m.client_url}/v3/{path}", json=body, timeout=5)
                r.raise_for_status()
                return r.json()
        raise RuntimeError("no etcd member answered")

    def logs(self) -> str:
        return "\n".join(f"--- {m.name}\n{m.log.read_text()[-1500:]}"
                         for m in self.members if m.log.exists())


@dataclass
class Node:
    name: str
    daemon: Daemon
    pair: Pair

    def client(self) -> httpx.Client:
        return self.daemon.client()


@dataclass
class FleetLab:
    workdir: Path
    etcd: EtcdCluster
    prefix: str = field(default_factory=lambda: f"/xdpfw-test-{uuid.uuid4().hex[:8]}/")
    nodes: list[Node] = field(default_factory=list)
    namespaces: list[str] = field(default_factory=list)

    def config(self, name: str, extra: str = "") -> Path:
        path = self.workdir / f"{name}.toml"
        urls = ", ".join(f'"{u}"' for u in self.etcd.endpoints)
        path.write_text(f'[fleet]\netcd = [{urls}]\nprefix = "{self.prefix}"\n'
                        f'node = "{name}"\ntimeout_s = 2.0\nstatus_ttl_s = 5\n{extra}')
        return path

    def add_nodes(self, count: int, max_rules: int = 65536) -> None:
        made = []
        for i in range(count):
            name = f"n{len(self.nodes) + i + 1}"
            tag = uuid.uuid4().hex[:6]
            pair = Pair(f"xdpfw-fc{i}-{tag}", f"xdpfw-fs{i}-{tag}")
            for ns in (pair.client, pair.server):
                nsutil.create_netns(ns)
                self.namespaces.append(ns)
            nsutil.veth_pair(
                pair.client, pair.client_if, pair.server, pair.server_if,
                (nsutil.Addr(pair.client4, 24),), (nsutil.Addr(pair.server4, 24),))
            work = self.workdir / name
            work.mkdir()
            d = Daemon(work, new_pin_dir(),
                       extra_args=["--config", str(self.config(name)), "--max-rules",
                                   str(max_rules)])
            made.append(Node(name, d, pair))
        with ThreadPoolExecutor(len(made)) as pool:  # each compiles its program: in parallel
            list(pool.map(lambda n: n.daemon.start(timeout=120), made))
        for n in made:
            r = n.client().post("/api/v1/interfaces", json={
                "name": n.pair.server_if, "netns": n.pair.server, "mode": "generic"})
            assert r.status_code == 201, r.text
        self.nodes += made

    def close(self) -> None:
        for n in self.nodes:
            n.daemon.stop()
        self.etcd.stop()
        for n in self.nodes:
            shutil.rmtree(n.daemon.pin_dir, ignore_errors=True)
        for ns in self.namespaces:
            nsutil.remove_netns(ns)

    def fleet(self, node: Node) -> dict:
        r = node.client().get("/api/v1/fleet")
        assert r.status_code == 200, r.text
        return r.json()

    def own_status(self, node: Node) -> dict:
        view = self.fleet(node)
        return next(n for n in view["nodes"] if n["node"] == node.name)

    def wait_converged(self, timeout: float = 15.0) -> int:
        """Until every node has applied the same revision as the fleet's last change.
        Returns that revision."""
        deadline = time.monotonic() + timeout
        seen: list = []
        while time.monotonic() < deadline:
            views = [self.fleet(n) for n in self.nodes]
            revision = views[0]["revision"]
            seen = [(n.name, self.own_status(n)["applied_revision"], v["revision"])
                    for n, v in zip(self.nodes, views, strict=True)]
            if revision and all(a == revision and r == revision for _, a, r in seen):
                return revision
            time.sleep(0.05)
        raise AssertionError(f"the nodes did not converge: (node, applied, fleet) {seen}")


def pinned_v4_verdicts(pin_dir: str, addresses: list[str]) -> list[bool]:
    """For each address: does a daemon's pinned IPv4 layout give it a rule? Read through
    handles of our own, the way the program reads it (FirewallMaps.v4_verdict)."""
    from types import SimpleNamespace

    from xdpfw.dataplane.maps import FirewallMaps, open_map

    names = ("v4_tbl24", "v4_tbl8", "v4_verdicts")
    handles = SimpleNamespace(**{n: open_map(pin_dir, n) for n in names})
    try:
        return [FirewallMaps.v4_verdict(handles, int.from_bytes(socket.inet_aton(a), "big")) != 0
                for a in addresses]
    finally:
        for n in names:
            getattr(handles, n).close()
