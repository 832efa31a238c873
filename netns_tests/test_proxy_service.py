"""Forward mode `proxy` end to end: a real `xdpfw serve`, services over REST, real TCP.

    client ns (cli0 10.220.1.2) --- clip0 (10.220.1.1, XDP generic, policy pass)
                                    appliance ns ([lb].netns; VIP 10.220.100.1 on lo)
    backend ns 1 (eth0 10.220.2.2, 10.220.20.1 on lo) --- bep1 (10.220.2.1)
    backend ns 2 (eth0 10.220.3.2, 10.220.20.2 on lo) --- bep2 (10.220.3.1)

The backends' addresses sit on their loopbacks, reached through a route via their link
address: no ARP answers for them, so only a service that resolves no MAC can use them. The XDP
program on clip0 must pass the VIP's packets to the engine's listening socket.
Everything is created here, bounded in count and time, and removed at the end.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from conftest import require_kernel
from netns_tests.conftest import Daemon
from netns_tests.traffic import assert_spliced_count
from xdpfw import netns as nsutil
from xdpfw.api.app import create_app
from xdpfw.dataplane import dataplane
from xdpfw.dataplane.loader import ProgramConfig
from xdpfw.lb import service as lb_service
from xdpfw.proxy.loader import SockProxyError
from xdpfw.service import Firewall

PY = sys.executable
ROOT = Path(__file__).resolve().parent.parent
CLIENT, APP_CLI = "10.220.1.2", "10.220.1.1"
VIP = "10.220.100.1"
LINKS = [("10.220.2.1", "10.220.2.2"), ("10.220.3.1", "10.220.3.2")]  # appliance, backend
BACKENDS = ["10.220.20.1", "10.220.20.2"]  # on the backends' loopbacks: routed, no ARP
PORT, DEAD_PORT, RESTART_PORT, FALLBACK_PORT = 8080, 8081, 8082, 8083  # none on DEAD_PORT
FLOOD_PORT = 8084
CONNECTIONS, SMALL, BIG = 80, 16 * 1024, 4 * 1024 * 1024

# Per connection: send the backend's name, read to EOF, answer "<sha256> <bytes>", close.
SERVER = """
import hashlib, socket, sys, threading
name, host, port = sys.argv[1].encode(), sys.argv[2], int(sys.argv[3])
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((host, port)); s.listen(256)
print('ready', flush=True)
def serve(c):
    with c:
        c.settimeout(60)
        c.sendall(name + b'\\n')
        h, n = hashlib.sha256(), 0
        while chunk := c.recv(1 << 16):
            h.update(chunk); n += len(chunk)
        c.sendall(b'%s %d\\n' % (h.hexdigest().encode(), n))
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""

# Connections with sizes from argv; checks each answer's SHA-256 against what it sent.
CLIENT_SCRIPT = """
import hashlib, json, os, socket, sys
vip, port, sizes = sys.argv[1], int(sys.argv[2]), [int(x) for x in sys.argv[3].split(',')]
seen, errors, mismatches, sent, received = {}, [], [], 0, 0
for i, size in enumerate(sizes):
    payload = os.urandom(size)
    try:
        with socket.create_connection((vip, port), timeout=10) as c:
            c.settimeout(30)
            # The name line first: it proves the splice is done. A client that half-closes
            # before then is relayed in user space (sockhash takes ESTABLISHED sockets only).
            data = b''
            while b'\\n' not in data and (chunk := c.recv(100)):
                data += chunk
            c.sendall(payload); sent += size
            c.shutdown(socket.SHUT_WR)
            while chunk := c.recv(1 << 16):
                data += chunk
        received += len(data)
        name, answer = data.decode().splitlines()
        seen[name] = seen.get(name, 0) + 1
        want = f'{hashlib.sha256(payload).hexdigest()} {size}'
        if answer != want:
            mismatches.append(f'{i}: {name} answered {answer!r}, want {want!r}')
    except (OSError, ValueError) as e:
        errors.append(f'{i}: {type(e).__name__}: {e}')
print(json.dumps({'seen': seen, 'errors': errors[:5], 'failed': len(errors),
                  'mismatches': mismatches[:5], 'sent': sent, 'received': received}))
"""

# One connection to a service whose backend refuses: a clean close is EOF, not a reset.
REFUSED = """
import socket, sys
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
c.settimeout(10)
try:
    c.sendall(b'hello')
    print('eof' if c.recv(100) == b'' else 'data')
except ConnectionResetError as e:
    print('reset', e)
"""


@dataclass
class Env:
    appliance: str
    client: str
    backends: list[str]
    daemon: Daemon
    servers: list[subprocess.Popen] = field(default_factory=list)

    def api(self):
        return self.daemon.client()

    def create(self, **body) -> dict:
        r = self.api().post("/api/v1/services", json=body)
        assert r.status_code == 201, f"{r.status_code} {r.text}\n{self.daemon.log()}"
        return r.json()

    def delete(self, sid: int) -> None:
        """Teardown of a test's service; a daemon that failed to come back has none left."""
        if self.daemon.proc is not None and self.daemon.proc.poll() is None:
            self.api().delete(f"/api/v1/services/{sid}")

    def service(self, sid: int) -> dict:
        r = self.api().get(f"/api/v1/services/{sid}")
        assert r.status_code == 200, r.text
        return r.json()

    def evidence(self, sid: int) -> str:
        return f"\nservice: {json.dumps(self.service(sid), indent=1)}\n" \
               f"daemon log (tail):\n{self.daemon.log()[-2000:]}"

    def run_client(self, port: int, sizes: list[int]) -> dict:
        proc = nsutil.run_in(self.client, [PY, "-c", CLIENT_SCRIPT, VIP, str(port),
                                           ",".join(map(str, sizes))], timeout=120)
        assert proc.returncode == 0, f"client: {proc.stdout}{proc.stderr}"
        return json.loads(proc.stdout)

    def settled(self, sid: int, accepted: int) -> dict:
        """The service once `accepted` connections were accepted and all are closed."""
        last: dict = {}

        def done() -> bool:
            nonlocal last
            last = self.service(sid)
            c = last["proxy"]["connections"]
            return c["accepted"] == accepted and c["active"] == 0 and c["closed"] == accepted

        assert nsutil.wait_until(done, timeout=20, interval=0.2), (
            f"connections did not settle at {accepted}:{self.evidence(sid)}")
        return last


def sh(ns: str, *argv: str) -> None:
    proc = nsutil.run_in(ns, list(argv))
    assert proc.returncode == 0, f"{ns}: {' '.join(argv)}: {proc.stdout}{proc.stderr}"


def build(names: list[str]) -> tuple[str, str, list[str]]:
    for n in names:
        nsutil.create_netns(n)
    app, cli, *bes = names
    nsutil.veth_pair(cli, "cli0", app, "clip0", [nsutil.Addr(CLIENT, 24)],
                     [nsutil.Addr(APP_CLI, 24)])
    sh(cli, "ip", "route", "add", "default", "via", APP_CLI)
    sh(app, "ip", "addr", "add", f"{VIP}/32", "dev", "lo")
    for i, (ns, (app_addr, be_addr), lo) in enumerate(zip(bes, LINKS, BACKENDS, strict=True)):
        nsutil.veth_pair(ns, "eth0", app, f"bep{i + 1}", [nsutil.Addr(be_addr, 24)],
                         [nsutil.Addr(app_addr, 24)])
        sh(ns, "ip", "addr", "add", f"{lo}/32", "dev", "lo")
        sh(ns, "ip", "route", "add", "default", "via", app_addr)
        sh(app, "ip", "route", "add", f"{lo}/32", "via", be_addr)
    for addr in (APP_CLI, VIP):
        ok = nsutil.wait_until(lambda a=addr: nsutil.run_in(
            cli, ["ping", "-c1", "-W1", a]).returncode == 0, timeout=10)
        assert ok, f"client cannot ping {addr}"
    for lo in BACKENDS:
        ok = nsutil.wait_until(lambda a=lo: nsutil.run_in(
            app, ["ping", "-c1", "-W1", a]).returncode == 0, timeout=10)
        assert ok, f"appliance cannot reach backend {lo}: {nsutil.run_in(app, ['ip', 'route'])}"
    return app, cli, bes


def start_server(ns: str, name: str, host: str, port: int) -> subprocess.Popen:
    proc = subprocess.Popen(["ip", "netns", "exec", ns, PY, "-c", SERVER, name, host, str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert line.strip() == "ready", f"server {name} in {ns}: {line!r} {proc.stderr.read()}"
    return proc


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> Iterator[Env]:
    require_kernel()
    tag = uuid.uuid4().hex[:4]
    names = [f"xdpfw-px{tag}-{r}" for r in ("app", "cli", "be1", "be2")]
    workdir = tmp_path_factory.mktemp("proxysvc")
    daemon = Daemon(workdir, f"/sys/fs/bpf/xdpfw-test-px{tag}")
    env = None
    try:
        app, cli, bes = build(names)
        config = workdir / "xdpfw.toml"
        config.write_text(f'[lb]\nnetns = "{app}"\ntable_size = 251\nmax_services = 8\n'
                          "max_backends = 64\nconntrack_size = 1024\n")
        daemon.extra_args = ["--config", str(config)]
        daemon.start()
        env = Env(app, cli, bes, daemon)
        r = env.api().post("/api/v1/interfaces", json={
            "name": "clip0", "netns": app, "mode": "generic", "policy": "pass"})
        assert r.status_code in (200, 201), r.text
        for i, (ns, lo) in enumerate(zip(bes, BACKENDS, strict=True)):
            for port in (PORT, RESTART_PORT, FALLBACK_PORT):
                env.servers.append(start_server(ns, f"be{i + 1}", lo, port))
        yield env
    finally:
        if env is not None:
            for proc in env.servers:
                proc.kill()
                proc.wait()
        daemon.stop()
        for ns in names:
            if ns in nsutil.list_netns():
                nsutil.remove_netns(ns)
        shutil.rmtree(daemon.pin_dir, ignore_errors=True)


def test_proxy_spreads_splices_and_counts(env):
    svc = env.create(name="px", vip=VIP, port=PORT, forward="proxy",
                     backends=[{"address": a} for a in BACKENDS])
    sid = svc["id"]
    assert svc["forward"] == "proxy" and svc["mode_in_use"] == "sockhash", env.evidence(sid)
    assert svc["fallback_reason"] is None, env.evidence(sid)
    for b in svc["backends"]:
        assert b["resolved"] and b["mac"] is None and b["in_table"], svc["backends"]

    sizes = [SMALL] * CONNECTIONS + [BIG]
    result = env.run_client(PORT, sizes)
    assert result["failed"] == 0 and not result["mismatches"], f"{result}{env.evidence(sid)}"
    seen = result["seen"]
    for name in ("be1", "be2"):
        assert seen.get(name, 0) >= CONNECTIONS // 5, (
            f"{name} got {seen.get(name, 0)} of {len(sizes)} connections: {seen}"
            f"{env.evidence(sid)}")

    view = env.settled(sid, len(sizes))
    px = view["proxy"]
    assert px["connections"]["backend_failures"] == 0, env.evidence(sid)
    assert px["connections"]["relayed_in_userspace"] == 0, env.evidence(sid)
    # Read from sp_traffic: every byte crossed the kernel splice, none was copied by us.
    assert result["sent"] == sum(sizes), result
    assert_spliced_count(px["kernel_bytes_to_backend"], sum(sizes), env.evidence(sid))
    assert_spliced_count(px["kernel_bytes_to_client"], result["received"], env.evidence(sid))
    assert px["bytes_to_backend"] == px["kernel_bytes_to_backend"], env.evidence(sid)
    # XDP passed the VIP's packets: the service never entered the XDP maps.
    assert view["forwarded"]["packets"] == 0, env.evidence(sid)
    # The same counters in Prometheus.
    samples = {(m.name, tuple(sorted(m.labels.items()))): m.value
               for fam in text_string_to_metric_families(env.api().get("/metrics").text)
               for m in fam.samples}
    svc_labels = (("service", str(sid)), ("service_name", "px"))

    def metric(name: str, **extra: str) -> float:
        return samples[(name, tuple(sorted(svc_labels + tuple(extra.items()))))]

    assert metric("xdpfw_proxy_connections_total", event="accepted") == len(sizes)
    assert metric("xdpfw_proxy_connections_total", event="queue_resets") == 0
    assert metric("xdpfw_proxy_connections_active") == 0
    assert metric("xdpfw_proxy_bytes_total", direction="to_backend", path="kernel") == (
        px["kernel_bytes_to_backend"])
    assert metric("xdpfw_proxy_bytes_total", direction="to_backend", path="userspace") == 0

    # A deleted backend takes no new connections.
    be1 = next(b for b in svc["backends"] if b["address"] == BACKENDS[0])
    r = env.api().delete(f"/api/v1/services/{sid}/backends/{be1['id']}")
    assert r.status_code == 200, r.text
    after = env.run_client(PORT, [SMALL] * 30)
    assert after["seen"] == {"be2": 30} and not after["mismatches"], (
        f"after deleting be1: {after}{env.evidence(sid)}")
    env.delete(sid)


def test_refusing_backend_closes_client_cleanly(env):
    svc = env.create(name="dead", vip=VIP, port=DEAD_PORT, forward="proxy",
                     backends=[{"address": BACKENDS[0]}])
    sid = svc["id"]
    try:
        proc = nsutil.run_in(env.client, [PY, "-c", REFUSED, VIP, str(DEAD_PORT)], timeout=30)
        assert proc.stdout.strip() == "eof", f"client: {proc.stdout}{proc.stderr}" \
                                             f"{env.evidence(sid)}"
        view = env.settled(sid, 1)
        assert view["proxy"]["connections"]["backend_failures"] == 1, env.evidence(sid)
    finally:
        env.delete(sid)


def test_restart_restores_proxy_service(env):
    svc = env.create(name="kept", vip=VIP, port=RESTART_PORT, forward="proxy",
                     backends=[{"address": a} for a in BACKENDS])
    sid = svc["id"]
    try:
        env.daemon.stop()
        env.daemon.start()
        view = env.service(sid)
        assert view["forward"] == "proxy" and view["mode_in_use"] == "sockhash", (
            env.evidence(sid))
        assert sorted(b["address"] for b in view["backends"]) == BACKENDS, view
        result = env.run_client(RESTART_PORT, [SMALL] * 10)
        assert result["failed"] == 0 and not result["mismatches"], (
            f"after restart: {result}{env.evidence(sid)}")
        assert_spliced_count(env.settled(sid, 10)["proxy"]["kernel_bytes_to_backend"],
                             10 * SMALL, env.evidence(sid))
    finally:
        env.delete(sid)


@contextlib.contextmanager
def flood_daemon(env, tmp_path, lb_lines: str) -> Iterator[tuple[Daemon, int]]:
    """A daemon with 1024 open files and [lb] lb_lines, backends on FLOOD_PORT and the port
    after it; yields it with its proxied-connection budget. Stops it all on the way out."""
    from xdpfw.config import load_config
    from xdpfw.daemon import proxy_limits, tcp_limits

    nofile = 1024
    config = tmp_path / "xdpfw.toml"
    config.write_text(f'[lb]\nnetns = "{env.appliance}"\ntable_size = 251\n'
                      f"max_services = 8\nmax_backends = 64\nconntrack_size = 1024\n{lb_lines}")
    cfg = load_config(config)
    budget = proxy_limits(cfg, nofile, tcp_limits(cfg, nofile)).max_connections
    d = Daemon(tmp_path / "d", f"/sys/fs/bpf/xdpfw-test-pxfl{uuid.uuid4().hex[:4]}",
               extra_args=["--config", str(config)], nofile_hard=nofile)
    d.workdir.mkdir()
    servers = [start_server(ns, f"be{i + 1}", lo, port)
               for i, (ns, lo) in enumerate(zip(env.backends, BACKENDS, strict=True))
               for port in (FLOOD_PORT, FLOOD_PORT + 1)]
    try:
        d.start()
        yield d, budget
    finally:
        for proc in servers:
            proc.kill()
            proc.wait()
        d.stop()
        shutil.rmtree(d.pin_dir, ignore_errors=True)


@contextlib.contextmanager
def held_connections(env, port: int, n: int) -> Iterator[subprocess.Popen]:
    """n connections from the client to VIP:port (netns_tests/holdconns.py), held until the
    block ends (or stdin closes); each answered: connected, or reset by the proxy as
    connect() returned."""
    holder = subprocess.Popen(["ip", "netns", "exec", env.client, PY, "-m",
                               "netns_tests.holdconns", VIP, str(port), CLIENT, str(n)],
                              cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        report = json.loads(holder.stdout.readline() or "{}")
        if report.get("handshakes") != n:
            holder.kill()
            raise AssertionError(f"{report} of {n} connections held: {holder.stderr.read()}")
        yield holder
    finally:
        holder.kill()
        holder.wait()


def create_proxy_service(d: Daemon, name: str, port: int) -> int:
    r = d.client().post("/api/v1/services", json={
        "name": name, "vip": VIP, "port": port, "forward": "proxy",
        "backends": [{"address": a} for a in BACKENDS]})
    assert r.status_code == 201, f"{r.text}\n{d.log()}"
    return r.json()["id"]


def test_a_connection_flood_at_a_vip_leaves_the_api_its_descriptors(env, tmp_path):
    """A daemon with 1024 open files: without a limit, 600 connections held at a proxy VIP
    (two descriptors each) would take every descriptor, and the API could not accept. The
    daemon sizes [lb] proxy_max_connections from the limit; past it the engine does not
    accept, the API answers, another proxy service still has the reserve, and the held
    connections get their turn when others close. The flood comes from one address here, as
    it would from many: the per-client cap (its own test below) is off."""
    flood = 600
    with flood_daemon(env, tmp_path, "proxy_max_connections_per_client = 0\n") as (d, budget):
        assert budget < flood // 2, f"budget {budget}: the flood would not reach it"
        sid = create_proxy_service(d, "flood", FLOOD_PORT)
        create_proxy_service(d, "other", FLOOD_PORT + 1)
        # Two proxy services: the flooded one may take all but the reserve (a quarter), less
        # the slot the other's engine holds for its next accept.
        flooded_cap = budget - budget // 4 - 1

        def conns() -> dict:
            return d.client().get(f"/api/v1/services/{sid}").json()["proxy"]["connections"]

        with held_connections(env, FLOOD_PORT, flood) as holder:
            assert nsutil.wait_until(lambda: conns()["accepted"] >= flooded_cap, 20, 0.2), (
                conns())
            time.sleep(0.5)  # give the engine time to take more if it would
            c = conns()
            assert (c["accepted"], c["active"]) == (flooded_cap, flooded_cap), c
            assert c["limit_waits"] >= 1 and c["client_refusals"] == 0, c
            with d.client() as api:  # the API still accepts and works
                api.timeout = httpx.Timeout(2.0)
                assert api.get("/healthz").status_code == 200
                r = api.post("/api/v1/rules", json={"prefix": "10.220.250.0/24",
                                                    "action": "drop"})
                assert r.status_code == 201, r.text
            assert "proxy_max_connections" in d.log(), d.log()[-2000:]
            other = env.run_client(FLOOD_PORT + 1, [SMALL] * 5)  # the other still serves
            assert other["failed"] == 0 and not other["mismatches"], other
            holder.stdin.close()  # the held connections close; the waiting ones get accepted
            assert nsutil.wait_until(
                lambda: (lambda c: c["accepted"] == flood and c["active"] == 0)(conns()),
                30, 0.2), f"{conns()}\n{d.log()[-2000:]}"
        assert conns()["backend_failures"] == 0, conns()


def test_one_client_address_holds_at_most_a_quarter_of_the_budget_by_default(env, tmp_path):
    """As shipped ([lb] proxy_max_connections_per_client unset): one address flooding a VIP
    gets a quarter of the proxied-connection budget; its connections past that are reset as
    they are accepted and counted, the budget is not spent (no limit_waits), and the log
    says so once, not per connection. Once it lets go, it is served again."""
    flood = 200
    with flood_daemon(env, tmp_path, "") as (d, budget):
        cap = budget // 4
        assert cap < flood, f"cap {cap}: the flood would not reach it"
        sid = create_proxy_service(d, "flood", FLOOD_PORT)

        def conns() -> dict:
            return d.client().get(f"/api/v1/services/{sid}").json()["proxy"]["connections"]

        with held_connections(env, FLOOD_PORT, flood):
            assert nsutil.wait_until(
                lambda: conns()["client_refusals"] == flood - cap, 20, 0.2), conns()
            c = conns()
            assert (c["accepted"], c["active"], c["limit_waits"]) == (cap, cap, 0), c
            assert d.log().count("proxy_max_connections_per_client") == 1, d.log()[-3000:]
            refusals = [m.value for fam in text_string_to_metric_families(
                            d.client().get("/metrics").text) for m in fam.samples
                        if m.name == "xdpfw_proxy_connections_total"
                        and m.labels == {"service": str(sid), "service_name": "flood",
                                         "event": "client_refusals"}]
            assert refusals == [flood - cap], refusals
        assert nsutil.wait_until(lambda: conns()["active"] == 0, 30, 0.2), conns()
        result = env.run_client(FLOOD_PORT, [SMALL] * 5)
        assert result["failed"] == 0 and not result["mismatches"], result


def test_kernel_refusal_falls_back_to_userspace(env, tmp_path, monkeypatch, caplog):
    """In process, with the sockproxy load refused: the service relays and says why."""
    def refuse(*_args, **_kwargs):
        raise SockProxyError("sk_skb programs refused (test)")

    monkeypatch.setattr(dataplane, "SockProxyDataplane", refuse)
    pin_dir = f"/sys/fs/bpf/xdpfw-test-pxfb{uuid.uuid4().hex[:4]}"
    fw = Firewall(tmp_path, ProgramConfig(pin_dir=pin_dir, max_rules=1024, max_port_rules=256,
                                          max_ifaces=16, max_services=4, max_backends=16,
                                          lb_table_size=251, lb_ct_size=1024))
    lb = None
    try:
        lb = lb_service.LoadBalancer(tmp_path, fw.dp, env.appliance)
        api = TestClient(create_app(fw, lb=lb))
        r = api.post("/api/v1/services", json={"vip": VIP, "port": FALLBACK_PORT,
                                               "forward": "proxy",
                                               "backends": [{"address": BACKENDS[1]}]})
        assert r.status_code == 201, r.text
        svc = r.json()
        assert svc["mode_in_use"] == "userspace", svc
        assert "refused (test)" in (svc["fallback_reason"] or ""), svc
        assert any("kernel refused the sockhash proxy" in m for m in caplog.messages), (
            caplog.messages)
        result = env.run_client(FALLBACK_PORT, [SMALL] * 4)
        assert result["seen"] == {"be2": 4} and not result["mismatches"], result
        px = api.get(f"/api/v1/services/{svc['id']}").json()["proxy"]
        assert px["bytes_to_backend"] == 4 * SMALL and px["kernel_bytes_to_backend"] == 0, px
    finally:
        if lb is not None:
            lb.close()
        fw.close()
        shutil.rmtree(pin_dir, ignore_errors=True)
