"""The L4 load balancer end to end: real TCP between namespaces, services through the REST API.

    client ns (cli0 10.210.0.10) --+
    backend ns 1..3 (10.210.0.21-23, VIP on lo) --+-- br0 in the appliance ns --- lbp0 == lb0
                                                                  (XDP, 10.210.0.1)
    appliance ns lb1 (10.211.0.1) ---- backend ns 4 (10.211.0.2, VIP2 on lo): redirect mode

The client routes the VIPs via the appliance; the backends answer the client directly (DSR).
lb0 runs xdpfw in generic mode, except in test_tx_native_on_veth (what native needs on a veth
is written there).
Everything is created here, bounded in count and time, and removed at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from conftest import require_kernel
from xdpfw import netns as nsutil
from xdpfw.api.app import create_app
from xdpfw.dataplane import abi
from xdpfw.dataplane import attach as xdp_attach
from xdpfw.dataplane.attach import Mode, link_info
from xdpfw.dataplane.loader import ProgramConfig, load_program
from xdpfw.lb.service import LoadBalancer
from xdpfw.service import Firewall

PY = sys.executable
XDP_PASS = Path(__file__).resolve().parents[1] / "scripts" / "bench_progs" / "xdp_pass.c"
VIP, VIP2, PORT = "10.210.100.1", "10.210.100.2", 8080
CLIENT = "10.210.0.10"
LB_ADDR, LB2_ADDR, BE4 = "10.210.0.1", "10.211.0.1", "10.211.0.2"
BACKENDS = ["10.210.0.21", "10.210.0.22", "10.210.0.23"]
CONNECTIONS = 300
SPREAD = (0.20, 0.47)  # each of three backends, expected 1/3: about 5 standard deviations

# One thread per connection: sends its name, then echoes lines (long-lived connections).
SERVER = """
import socket, sys, threading
name = sys.argv[1].encode()
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(('0.0.0.0', int(sys.argv[2]))); s.listen(512)
print('ready', flush=True)
def serve(c):
    with c:
        c.sendall(name + b'\\n')
        f = c.makefile('rb')
        for line in f:
            c.sendall(line)
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""

# N short connections; prints {"backend name": count, "errors": [...]}.
SPREADER = """
import json, socket, sys
vip, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
seen, errors = {}, []
for i in range(n):
    try:
        with socket.create_connection((vip, port), timeout=2) as c:
            name = c.makefile('rb').readline().strip().decode()
            seen[name] = seen.get(name, 0) + 1
    except OSError as e:
        errors.append(f'{i}: {e}')
print(json.dumps({'seen': seen, 'errors': errors[:5], 'failed': len(errors)}), flush=True)
"""

# One long-lived connection: prints its backend, waits for a line on stdin, then proves
# the connection still works with echoes.
LONG_LIVED = """
import socket, sys
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
f = c.makefile('rb')
print(f.readline().strip().decode(), flush=True)
sys.stdin.readline()
try:
    for i in range(5):
        c.sendall(b'ping %d\\n' % i)
        assert f.readline() == b'ping %d\\n' % i
    print('alive', flush=True)
except Exception as e:
    print('dead', repr(e), flush=True)
"""


@dataclass
class Topology:
    appliance: str
    client: str
    backends: list[str]  # namespaces of BACKENDS, in order
    remote: str  # backend ns behind lb1 (redirect mode)
    state_dir: Path | None = None
    config: ProgramConfig | None = None
    servers: dict[str, subprocess.Popen] = field(default_factory=dict)
    api: TestClient | None = None
    lb: LoadBalancer | None = None
    fw: Firewall | None = None

    def start_server(self, ns: str, name: str) -> None:
        proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, PY, "-c", SERVER, name, str(PORT)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        line = proc.stdout.readline()
        assert line.strip() == "ready", f"server {name} in {ns}: {line!r} {proc.stderr.read()}"
        self.servers[name] = proc

    def stop_server(self, name: str) -> None:
        proc = self.servers.pop(name)
        proc.kill()
        proc.wait()


def sh(ns: str, *argv: str) -> None:
    proc = nsutil.run_in(ns, list(argv))
    assert proc.returncode == 0, f"{ns}: {' '.join(argv)}: {proc.stdout}{proc.stderr}"


def operstate(ns: str, ifname: str) -> str:
    with nsutil.rtnl(ns) as ip:
        return ip.get_links(nsutil.ifindex(ns, ifname))[0].get_attr("IFLA_OPERSTATE")


def build(names: list[str]) -> Topology:
    for n in names:
        nsutil.create_netns(n)
    app, cli, *bes = names
    topo = Topology(app, cli, bes[:3], bes[3])
    sh(app, "ip", "link", "add", "br0", "type", "bridge")
    sh(app, "ip", "link", "set", "br0", "up")
    sh(app, "sysctl", "-qw", "net.ipv4.ip_forward=1")
    # The appliance's NIC: lb0, whose peer lbp0 is a bridge port.
    nsutil.veth_pair(app, "lb0", app, "lbp0", [nsutil.Addr(LB_ADDR, 24)])
    nsutil.veth_pair(cli, "cli0", app, "clip0", [nsutil.Addr(CLIENT, 24)])
    sh(cli, "ip", "route", "add", f"{VIP}/32", "via", LB_ADDR)
    sh(cli, "ip", "route", "add", f"{VIP2}/32", "via", LB_ADDR)
    sh(cli, "ip", "route", "add", "10.211.0.0/24", "via", LB_ADDR)
    ports = ["lbp0", "clip0"]
    for i, (ns, addr) in enumerate(zip(topo.backends, BACKENDS, strict=True)):
        nsutil.veth_pair(ns, "eth0", app, f"bep{i}", [nsutil.Addr(addr, 24)])
        ports.append(f"bep{i}")
    nsutil.veth_pair(app, "lb1", topo.remote, "eth0", [nsutil.Addr(LB2_ADDR, 24)],
                     [nsutil.Addr(BE4, 24)])
    sh(topo.remote, "ip", "route", "add", "10.210.0.0/24", "via", LB2_ADDR)
    for p in ports:
        sh(app, "ip", "link", "set", p, "master", "br0")
    for ns, vip in [*((b, VIP) for b in topo.backends), (topo.remote, VIP2)]:
        sh(ns, "ip", "addr", "add", f"{vip}/32", "dev", "lo")
        # DSR: the VIP is for accepting packets, never for answering ARP.
        sh(ns, "sysctl", "-qw", "net.ipv4.conf.all.arp_ignore=1")
        sh(ns, "sysctl", "-qw", "net.ipv4.conf.all.arp_announce=2")
    # Ready when every link has carrier and the client reaches the appliance and the backends.
    for ns in (cli, *bes):
        assert nsutil.wait_until(lambda ns=ns: operstate(ns, "eth0" if ns != cli else "cli0")
                                 == "UP"), f"{ns}: link not up"
    for addr in (LB_ADDR, *BACKENDS):
        ok = nsutil.wait_until(lambda a=addr: nsutil.run_in(
            cli, ["ping", "-c1", "-W1", a]).returncode == 0, timeout=10)
        assert ok, f"client cannot ping {addr}: {nsutil.run_in(cli, ['ip', 'route']).stdout}"
    for i, ns in enumerate(topo.backends):
        topo.start_server(ns, f"be{i + 1}")
    topo.start_server(topo.remote, "be4")
    return topo


@pytest.fixture(scope="module")
def topo(tmp_path_factory):
    require_kernel()
    tag = uuid.uuid4().hex[:4]
    pin_dir = f"/sys/fs/bpf/xdpfw-test-lb{tag}"
    names = [f"xdpfw-lb{tag}-{r}" for r in ("app", "cli", "be1", "be2", "be3", "be4")]
    topo = None
    try:
        topo = build(names)
        cfg = ProgramConfig(pin_dir=pin_dir, max_rules=1024, max_port_rules=256, max_ifaces=16,
                            max_services=8, max_backends=64, lb_table_size=4093,
                            lb_ct_size=8192)
        topo.state_dir, topo.config = Path(tmp_path_factory.mktemp("lbstate")), cfg
        topo.fw = Firewall(topo.state_dir, cfg)
        # Generic mode: native XDP_TX on a veth needs an XDP program on the peer and full
        # checksums from the sender (test_tx_native_on_veth).
        topo.fw.attach_interface("lb0", topo.appliance, Mode.GENERIC, policy="pass")
        topo.lb = LoadBalancer(topo.fw.state_dir, topo.fw.dp, topo.appliance, refresh_s=1.0)
        topo.lb.start()
        topo.api = TestClient(create_app(topo.fw, lb=topo.lb))
        yield topo
    finally:
        if topo is not None:
            for name in list(topo.servers):
                topo.stop_server(name)
            if topo.lb:
                topo.lb.close()
            if topo.fw:
                topo.fw.detach_all()
                topo.fw.close()
        # Also after a failed build: whatever namespaces exist by then go.
        for ns in names:
            if ns in nsutil.list_netns():
                nsutil.remove_netns(ns)
        shutil.rmtree(pin_dir, ignore_errors=True)


@pytest.fixture
def service(topo):
    """create(**body) -> the service JSON; every service is deleted at teardown."""
    made: list[int] = []

    def create(**body) -> dict:
        r = topo.api.post("/api/v1/services", json=body)
        assert r.status_code == 201, r.text
        made.append(r.json()["id"])
        return r.json()

    yield create
    for sid in made:
        topo.api.delete(f"/api/v1/services/{sid}")
    topo.lb.maps.clear_conntrack()


def spread(topo: Topology, vip: str, n: int) -> dict:
    proc = nsutil.run_in(topo.client, [PY, "-c", SPREADER, vip, str(PORT), str(n)], timeout=60)
    assert proc.returncode == 0, f"spreader: {proc.stdout}{proc.stderr}"
    return json.loads(proc.stdout)


def evidence(topo: Topology, sid: int) -> str:
    svc = topo.api.get(f"/api/v1/services/{sid}").json()
    stats = topo.api.get("/api/v1/stats").json()
    return f"\nservice: {json.dumps(svc, indent=1)}\nfirewall stats: {stats['actions']}"


def tx_service(service, **extra) -> dict:
    return service(name="web", vip=VIP, port=PORT, proto="tcp", forward="tx",
                   backends=[{"address": a} for a in BACKENDS], **extra)


def test_unresolvable_backend_is_refused(topo, service):
    svc = tx_service(service)
    r = topo.api.post(f"/api/v1/services/{svc['id']}/backends", json={"address": "10.210.0.99"})
    assert r.status_code == 422 and "10.210.0.99" in r.json()["detail"], r.text
    assert len(topo.api.get(f"/api/v1/services/{svc['id']}/backends").json()) == 3


def test_tx_spreads_connections_and_keeps_long_lived_one(topo, service):
    svc = tx_service(service)
    macs = {b["address"]: b["mac"] for b in svc["backends"]}
    for ns, addr in zip(topo.backends, BACKENDS, strict=True):
        assert macs[addr] == nsutil.link_mac(ns, "eth0"), f"{addr}: {svc['backends']}"

    result = spread(topo, VIP, CONNECTIONS)
    seen = Counter(result["seen"])
    assert result["failed"] == 0, f"{result}{evidence(topo, svc['id'])}"
    for name in ("be1", "be2", "be3"):
        share = seen[name] / CONNECTIONS
        assert SPREAD[0] < share < SPREAD[1], (
            f"{name} got {share:.0%} of {CONNECTIONS} connections, want {SPREAD}: {seen}"
            f"{evidence(topo, svc['id'])}"
        )
    fwd = topo.api.get(f"/api/v1/services/{svc['id']}").json()["forwarded"]["packets"]
    assert fwd >= 3 * CONNECTIONS, f"forwarded counter {fwd}{evidence(topo, svc['id'])}"

    # A long-lived connection, then another backend goes away.
    proc = subprocess.Popen(
        ["ip", "netns", "exec", topo.client, PY, "-c", LONG_LIVED, VIP, str(PORT)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        mine = proc.stdout.readline().strip()
        assert mine in ("be1", "be2", "be3"), f"long-lived connect: {mine!r} {proc.stderr.read()}"
        victim = next(b for b in svc["backends"] if f"be{BACKENDS.index(b['address']) + 1}"
                      != mine)
        r = topo.api.delete(f"/api/v1/services/{svc['id']}/backends/{victim['id']}")
        assert r.status_code == 200, r.text
        after = spread(topo, VIP, 60)
        gone = f"be{BACKENDS.index(victim['address']) + 1}"
        assert gone not in after["seen"] and after["failed"] == 0, (
            f"after removing {gone}: {after}{evidence(topo, svc['id'])}"
        )
        out, err = proc.communicate("go\n", timeout=10)
        assert out.strip() == "alive", (
            f"long-lived connection on {mine} broke when {gone} was removed: {out!r} {err!r}"
            f"{evidence(topo, svc['id'])}"
        )
    finally:
        proc.kill()


def test_health_check_takes_failed_backend_out(topo, service):
    interval, fall, timeout = 0.2, 2, 0.2
    svc = tx_service(service, health_check={
        "kind": "tcp", "interval_s": interval, "timeout_s": timeout, "rise": 1, "fall": fall})
    be3 = next(b for b in svc["backends"] if b["address"] == BACKENDS[2])
    url = f"/api/v1/services/{svc['id']}/backends/{be3['id']}"
    topo.stop_server("be3")
    try:
        start = time.monotonic()
        limit = fall * interval + timeout + 1.0  # the configured time, plus scheduling slack
        out = nsutil.wait_until(lambda: not topo.api.get(url).json()["in_table"], timeout=limit)
        took = time.monotonic() - start
        view = topo.api.get(url).json()
        assert out, f"be3 still in the table {took:.1f}s after its server stopped: {view}"
        assert view["healthy"] is False and view["health_error"], view
        result = spread(topo, VIP, 60)
        assert "be3" not in result["seen"] and result["failed"] == 0, (
            f"{result}{evidence(topo, svc['id'])}"
        )
    finally:
        topo.start_server(topo.backends[2], "be3")
    back = nsutil.wait_until(lambda: topo.api.get(url).json()["in_table"], timeout=3)
    assert back, f"be3 did not come back: {topo.api.get(url).json()}"


def test_redirect_delivers_through_second_nic(topo, service):
    svc = service(name="remote", vip=VIP2, port=PORT, proto="tcp", forward="redirect",
                  backends=[{"address": BE4}])
    assert svc["backends"][0]["interface"] == "lb1", svc
    result = spread(topo, VIP2, 20)
    assert result["seen"] == {"be4": 20}, f"{result}{evidence(topo, svc['id'])}"


# -- native XDP_TX on a veth --------------------------------------------------------------


def ethtool_stats(ns: str, ifname: str) -> dict[str, int]:
    """`ethtool -S`: veth's per-queue XDP counters (xdp_packets, xdp_tx, xdp_tx_errors, ...)."""
    proc = nsutil.run_in(ns, ["ethtool", "-S", ifname])
    assert proc.returncode == 0, f"{ns}: ethtool -S {ifname}: {proc.stdout}{proc.stderr}"
    out = {}
    for line in proc.stdout.splitlines()[1:]:
        name, _, val = line.strip().partition(":")
        if val.strip().isdigit():
            out[name.removeprefix("rx_queue_0_").removeprefix("tx_queue_0_")] = int(val)
    return out


def test_tx_native_on_veth(topo, service):
    """Native XDP_TX on a veth delivers when (1) the peer veth has an XDP program, so the kernel
    schedules its NAPI for the bounced frames (veth_xdp_flush), and (2) the sender computes full
    TCP checksums: native XDP turns the skb into an xdp_frame and loses CHECKSUM_PARTIAL, so
    with the client's TX checksum offload on, every SYN arrives with a bad checksum
    (TcpInCsumErrors at the backend). Without (1): xdp_tx_errors on lb0 (no NAPI) or xdp_tx
    counted but never received by lbp0 (NAPI from GRO alone)."""
    app = topo.appliance
    pin_dir = f"{topo.config.pin_dir}-peer"
    peer = load_program(ProgramConfig(pin_dir=pin_dir, source=XDP_PASS), entry="xdp_pass",
                        slotted=False)
    sh(topo.client, "ethtool", "-K", "cli0", "tx", "off")
    topo.fw.detach_interface("lb0", app)
    try:
        xdp_attach.attach("lbp0", app, peer.fd, Mode.NATIVE)
        topo.fw.attach_interface("lb0", app, Mode.NATIVE, policy="pass")
        assert link_info("lb0", app)[1] is Mode.NATIVE, link_info("lb0", app)
        svc = tx_service(service)
        before_lb0, before_peer = ethtool_stats(app, "lb0"), ethtool_stats(app, "lbp0")
        n = 60
        result = spread(topo, VIP, n)
        lb0, peer_stats = ethtool_stats(app, "lb0"), ethtool_stats(app, "lbp0")
        tx = lb0["xdp_tx"] - before_lb0["xdp_tx"]
        counters = (f"\nlb0 xdp_tx +{tx}, xdp_tx_errors "
                    f"+{lb0['xdp_tx_errors'] - before_lb0['xdp_tx_errors']}; lbp0 xdp_packets "
                    f"+{peer_stats['xdp_packets'] - before_peer['xdp_packets']}"
                    f"{evidence(topo, svc['id'])}")
        assert result["failed"] == 0 and set(result["seen"]) == {"be1", "be2", "be3"}, (
            f"native tx mode: {result}{counters}")
        # SYN, ACK, name-line ACK and FIN per connection at least leave through XDP_TX.
        assert tx >= 3 * n and lb0["xdp_tx_errors"] == before_lb0["xdp_tx_errors"], counters
    finally:
        with contextlib.suppress(Exception):
            topo.fw.detach_interface("lb0", app)
        xdp_attach.detach("lbp0", app)
        peer.close()
        shutil.rmtree(pin_dir, ignore_errors=True)
        sh(topo.client, "ethtool", "-K", "cli0", "tx", "on")
        topo.fw.attach_interface("lb0", app, Mode.GENERIC, policy="pass")


# -- backend changes with real traffic ----------------------------------------------------


class LongLived:
    """A connection through the VIP that stays open until check() proves it still echoes."""

    def __init__(self, topo: Topology, vip: str = VIP) -> None:
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", topo.client, PY, "-c", LONG_LIVED, vip, str(PORT)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        self.backend = self.proc.stdout.readline().strip()
        assert self.backend in ("be1", "be2", "be3"), (
            f"long-lived connect: {self.backend!r} {self.proc.stderr.read()}")

    def check(self) -> tuple[bool, str]:
        out, err = self.proc.communicate("go\n", timeout=10)
        return out.strip() == "alive", f"{out!r} {err!r}"

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


def name_of(address: str) -> str:
    return f"be{BACKENDS.index(address) + 1}"


def test_patch_draining_keeps_flows_and_weight_changes_shares(topo, service):
    svc = tx_service(service)
    url = f"/api/v1/services/{svc['id']}/backends"
    by_name = {name_of(b["address"]): b for b in svc["backends"]}
    conn = LongLived(topo)
    try:
        mine = conn.backend
        r = topo.api.patch(f"{url}/{by_name[mine]['id']}", json={"state": "draining"})
        assert r.status_code == 200, r.text
        assert r.json()["state"] == "draining" and not r.json()["in_table"], r.json()
        after = spread(topo, VIP, 60)
        assert mine not in after["seen"] and after["failed"] == 0, (
            f"{mine} is draining yet took new connections: {after}{evidence(topo, svc['id'])}")
        alive, said = conn.check()
        assert alive, (f"the established connection on draining {mine} broke: {said}"
                       f"{evidence(topo, svc['id'])}")
    finally:
        conn.close()

    # Weights 0 / 3 / 1: be1 gets nothing, be2 three quarters, be3 a quarter.
    for name, weight in (("be1", 0), ("be2", 3), ("be3", 1)):
        r = topo.api.patch(f"{url}/{by_name[name]['id']}",
                           json={"weight": weight, "state": "active"})
        assert r.status_code == 200 and r.json()["weight"] == weight, r.text
    shares = {name_of(b["address"]): b["share"] for b in topo.api.get(url).json()}
    assert shares["be1"] == 0 and abs(shares["be2"] - 0.75) < 0.03, f"table shares {shares}"
    topo.lb.maps.clear_conntrack()  # earlier flows of the same ports must not stick
    n = 120
    result = spread(topo, VIP, n)
    seen = Counter(result["seen"])
    assert result["failed"] == 0 and seen["be1"] == 0, f"{result}{evidence(topo, svc['id'])}"
    # 3/4 expected; +-0.15 is about 3.8 standard deviations at n=120.
    assert 0.60 < seen["be2"] / n < 0.90, (
        f"be2 (weight 3 of 4) got {seen['be2']} of {n}: {seen}{evidence(topo, svc['id'])}")


# -- control-plane restart ----------------------------------------------------------------


def conntrack(lb: LoadBalancer) -> dict[bytes, tuple[int, int] | None]:
    """Every conntrack flow -> (backend slot, generation)."""
    return {k: lb.maps.flow_backend(abi.LbFlow.from_buffer_copy(k))
            for k in lb.maps.conntrack.all_keys()}


def test_restart_restores_services_backends_table_and_conntrack(topo, service):
    svc = tx_service(service)
    sid = svc["id"]
    be2 = next(b for b in svc["backends"] if b["address"] == BACKENDS[1])
    r = topo.api.patch(f"/api/v1/services/{sid}/backends/{be2['id']}", json={"weight": 2})
    assert r.status_code == 200, r.text
    assert spread(topo, VIP, 30)["failed"] == 0
    conn = LongLived(topo)
    try:
        before = topo.api.get(f"/api/v1/services/{sid}").json()
        slot = topo.lb.services[sid].rec.slot
        row = topo.lb.maps.read_row(slot)
        flows = conntrack(topo.lb)
        assert flows, "no conntrack entries before the restart"

        # What `xdpfw serve` does on a restart: the control plane goes (maps and attachment
        # stay), a new one loads from the same state directory and pins.
        topo.lb.close()
        topo.fw.close()
        topo.lb = topo.fw = None
        topo.fw = Firewall(topo.state_dir, topo.config)
        topo.lb = LoadBalancer(topo.fw.state_dir, topo.fw.dp, topo.appliance, refresh_s=1.0)
        topo.lb.start()
        topo.api = TestClient(create_app(topo.fw, lb=topo.lb))

        after = topo.api.get(f"/api/v1/services/{sid}").json()
        keep = ("id", "vip", "port", "proto", "forward", "name")
        assert {k: after[k] for k in keep} == {k: before[k] for k in keep}, (before, after)
        fields = ("id", "address", "weight", "state", "mac", "share")
        want = sorted(tuple(b[f] for f in fields) for b in before["backends"])
        got = sorted(tuple(b[f] for f in fields) for b in after["backends"])
        assert got == want, f"backends before the restart {want}, after {got}"
        assert topo.lb.services[sid].rec.slot == slot
        new_row = topo.lb.maps.read_row(slot)
        moved = sum(a != b for a, b in zip(row, new_row, strict=True))
        assert new_row == row, f"Maglev row changed in {moved} of {len(row)} positions"
        now = conntrack(topo.lb)
        changed = {k.hex(): (v, now.get(k)) for k, v in flows.items() if now.get(k) != v}
        assert not changed, (f"{len(changed)} of {len(flows)} conntrack entries lost or moved "
                             f"(backend slot, generation): {list(changed.items())[:3]}")
        alive, said = conn.check()
        assert alive, f"connection on {conn.backend} broke over the restart: {said}"
        result = spread(topo, VIP, 30)
        assert result["failed"] == 0, f"after the restart: {result}{evidence(topo, sid)}"
    finally:
        conn.close()


# -- CPU steering -------------------------------------------------------------------------


def cpumap_kthread_switches(map_fd: int, cpu: int) -> int:
    """Context switches of the kernel thread cpumap runs for `cpu` (it wakes per batch)."""
    with open(f"/proc/self/fdinfo/{map_fd}") as f:
        map_id = next(line.split()[1] for line in f if line.startswith("map_id:"))
    want = f"cpumap/{cpu}/map:{map_id}"
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() != want:
                continue
            status = Path(f"/proc/{pid}/status").read_text().splitlines()
        except OSError:
            continue
        return sum(int(line.split()[1]) for line in status if "ctxt_switches" in line)
    raise AssertionError(f"no kernel thread {want}")


def test_cpu_steer_redirects_passing_flow_and_delivers(topo):
    """Global steering: traffic of no service (client -> be4, routed by the appliance) is
    redirected to CPUs through cpu_map, and still reaches its destination."""
    r = topo.api.put("/api/v1/cpu-steer", json={"cpus": [0, 1]})
    assert r.status_code == 200 and r.json()["cpus"] == [0, 1], r.text
    try:
        fd = topo.lb.maps.cpu_map.fd
        before = [cpumap_kthread_switches(fd, c) for c in (0, 1)]
        n = 40
        proc = nsutil.run_in(topo.client, [PY, "-c", SPREADER, BE4, str(PORT), str(n)],
                             timeout=60)
        assert proc.returncode == 0, proc.stderr
        result = json.loads(proc.stdout)
        after = [cpumap_kthread_switches(fd, c) for c in (0, 1)]
        assert result["seen"] == {"be4": n}, f"steered flows: {result}"
        woke = sum(after) - sum(before)
        assert woke > 0, f"cpumap threads did not run: switches {before} -> {after}"
    finally:
        r = topo.api.put("/api/v1/cpu-steer", json={"cpus": []})
        assert r.status_code == 200, r.text


def test_upgrade_keeps_the_load_balancer_working(topo, service):
    """After `xdpfw upgrade` with a tx service present, backends could no longer be added:
    the LB wrote through map fds of the build the upgrade had closed (500, EBADF). Now the
    handles belong to the pins, tx forwarding goes on across the swap, and the pinned maps
    hold what the API says."""
    from xdpfw.dataplane.maps import open_map

    svc = service(name="web", vip=VIP, port=PORT, proto="tcp", forward="tx",
                  backends=[{"address": a} for a in BACKENDS[:2]])
    during = subprocess.Popen(
        ["ip", "netns", "exec", topo.client, PY, "-c", SPREADER, VIP, str(PORT), "400"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(0.2)  # connections are flowing when the program is swapped
        r = topo.api.post("/api/v1/program/reload")
        assert r.status_code == 200, r.text
        out, err = during.communicate(timeout=60)
    finally:
        during.kill()
    result = json.loads(out)
    assert result["failed"] == 0, f"connections failed across the swap: {result} {err}"

    base = f"/api/v1/services/{svc['id']}/backends"
    r = topo.api.post(base, json={"address": BACKENDS[2]})
    assert r.status_code == 201, f"adding a backend after the upgrade: {r.text}"
    added = r.json()
    first = next(b for b in svc["backends"] if b["address"] == BACKENDS[0])
    r = topo.api.patch(f"{base}/{first['id']}", json={"state": "draining"})
    assert r.status_code == 200, f"draining after the upgrade: {r.text}"
    second = next(b for b in svc["backends"] if b["address"] == BACKENDS[1])
    r = topo.api.delete(f"{base}/{second['id']}")
    assert r.status_code == 200, f"deleting after the upgrade: {r.text}"

    # The pinned maps, read through handles of our own, hold what the API lists.
    services = open_map(topo.config.pin_dir, "lb_services")
    backends = open_map(topo.config.pin_dir, "lb_backends")
    try:
        keys, _ = services.dump()
        assert len(keys) // services.key_size == 1, "lb_services should hold the one VIP"
        _, values = backends.dump()
        live = sum(abi.LbBackend.from_buffer_copy(values, i).flags & abi.LB_BE_LIVE
                   for i in range(0, len(values), backends.value_size))
        listed = topo.api.get(base).json()
        assert live == len(listed) == 2, f"{live} live backend slots, API lists {listed}"
    finally:
        services.close()
        backends.close()
    result = spread(topo, VIP, 60)
    assert result["failed"] == 0 and set(result["seen"]) == {"be3"}, (
        f"only be3 takes new connections (be1 drains, be2 is gone): {result}"
        f"{evidence(topo, svc['id'])} {added}")
