"""The L4 load balancer end to end: real TCP between namespaces, services through the REST API.

    client ns (cli0 10.210.0.10) --+
    backend ns 1..3 (10.210.0.21-23, VIP on lo) --+-- br0 in the appliance ns --- lbp0 == lb0
                                                                  (XDP, 10.210.0.1)
    appliance ns lb1 (10.211.0.1) ---- backend ns 4 (10.211.0.2, VIP2 on lo): redirect mode

The client routes the VIPs via the appliance; the backends answer the client directly (DSR).
Everything is created here, bounded in count and time, and removed at the end.
"""

from __future__ import annotations

import json
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
from xdpfw.dataplane.attach import Mode
from xdpfw.dataplane.loader import ProgramConfig
from xdpfw.lb.service import LoadBalancer
from xdpfw.service import Firewall

PY = sys.executable
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
        topo.fw = Firewall(Path(tmp_path_factory.mktemp("lbstate")), cfg)
        # Generic mode: native XDP_TX/REDIRECT into a veth needs NAPI on the receiving peer
        # (GRO or an XDP program there); scripts/bench_lb.py measures native.
        topo.fw.attach_interface("lb0", topo.appliance, Mode.GENERIC, policy="pass")
        topo.lb = LoadBalancer(topo.fw, topo.appliance, refresh_s=1.0)
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
