"""Fixtures for end-to-end tests: a real `xdpfw serve` daemon and veth topologies."""

from __future__ import annotations

import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from conftest import require_kernel
from xdpfw import netns as nsutil

XDPFW = [sys.executable, "-m", "xdpfw"]


@dataclass
class Daemon:
    """`xdpfw serve` in a subprocess with its own socket, state and pins."""

    workdir: Path
    pin_dir: str
    proc: subprocess.Popen | None = None
    extra_args: list[str] = field(default_factory=list)
    starts: int = 0
    logs: list[str] = field(default_factory=list)
    socket_path: str | None = None  # default: workdir/api.sock
    nofile_soft: int | None = None  # start with this soft RLIMIT_NOFILE
    nofile_hard: int | None = None  # and this hard one (the daemon raises soft to hard)

    @property
    def socket(self) -> str:
        return self.socket_path or str(self.workdir / "api.sock")

    @property
    def state(self) -> Path:
        return self.workdir / "state"

    def argv(self) -> list[str]:
        return [*XDPFW, "serve", "--socket", self.socket, "--state-dir",
                str(self.state), "--bpffs-dir", self.pin_dir,
                "--max-rules", "65536", *self.extra_args]

    def _limits(self) -> None:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        hard = self.nofile_hard or hard
        soft = min(self.nofile_soft or soft, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    def start(self, timeout: float = 60.0) -> None:
        log = self.workdir / f"serve-{self.starts}.log"
        self.logs.append(str(log))
        self.starts += 1
        with open(log, "w") as out:
            self.proc = subprocess.Popen(self.argv(), stdout=out, stderr=subprocess.STDOUT,
                                         preexec_fn=self._limits)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"xdpfw serve exited {self.proc.returncode}:\n{self.log()}")
            try:
                if self.client().get("/healthz").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"xdpfw serve did not answer within {timeout}s:\n{self.log()}")

    def stop(self) -> None:
        terminate(self.proc, 15)
        self.proc = None

    def client(self) -> httpx.Client:
        return httpx.Client(
            transport=httpx.HTTPTransport(uds=self.socket), base_url="http://xdpfw", timeout=30
        )

    def log(self) -> str:
        return "".join(Path(p).read_text()[-3000:] for p in self.logs if os.path.exists(p))


def terminate(proc: subprocess.Popen | None, timeout: float) -> None:
    """SIGTERM, then SIGKILL after timeout seconds; a process already gone is fine."""
    if proc is not None and proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tcp_config(workdir: Path, port: int, token: str = "t0ken", extra: str = "") -> list[str]:
    """extra_args for a daemon that also listens on 127.0.0.1:port (with `token`)."""
    cfg = workdir / "xdpfw.toml"
    cfg.write_text(f'[api]\nlisten = ["127.0.0.1:{port}"]\ntoken = "{token}"\n{extra}')
    return ["--config", str(cfg)]


def new_pin_dir() -> str:
    return f"/sys/fs/bpf/xdpfw-test-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    require_kernel()
    d = Daemon(tmp_path_factory.mktemp("xdpfw"), f"/sys/fs/bpf/xdpfw-test-{uuid.uuid4().hex[:8]}")
    d.start()
    yield d
    d.stop()
    shutil.rmtree(d.pin_dir, ignore_errors=True)


TOKEN = "t0ken-for-the-dashboard"


@dataclass
class TcpDaemon:
    daemon: Daemon
    api_url: str  # the API's TCP listener (token required)
    ui_url: str  # the [ui] listener (the same app, the same token)
    metrics_url: str  # the [metrics] listener (/metrics only, no token)
    lb_netns: str  # its [lb] netns: where proxy services listen and backends are reached
    token: str = TOKEN


def off_loop(fn, *args):
    """Run fn in a thread of its own: Playwright's sync API keeps an asyncio loop running on
    this thread, and pyroute2's sync API refuses to run under one."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(fn, *args).result()


@pytest.fixture(scope="module")
def tcp_daemon(tmp_path_factory):
    """A daemon listening on TCP for the API, the dashboard and the metrics (127.0.0.1), its
    load balancer in a namespace of its own (empty until a test joins one to it)."""
    require_kernel()
    work = tmp_path_factory.mktemp("xdpfw-tcp")
    api, ui, metrics = free_port(), free_port(), free_port()
    lb_netns = f"xdpfw-tlb-{uuid.uuid4().hex[:6]}"
    off_loop(nsutil.create_netns, lb_netns)
    extra = (f'[ui]\nlisten = ["127.0.0.1:{ui}"]\n[metrics]\nlisten = "127.0.0.1:{metrics}"\n'
             f'[lb]\nnetns = "{lb_netns}"\n')
    d = Daemon(work, new_pin_dir(), extra_args=tcp_config(work, api, TOKEN, extra))
    try:
        d.start()
        yield TcpDaemon(d, f"http://127.0.0.1:{api}", f"http://127.0.0.1:{ui}",
                        f"http://127.0.0.1:{metrics}", lb_netns)
    finally:
        d.stop()
        shutil.rmtree(d.pin_dir, ignore_errors=True)
        off_loop(nsutil.remove_netns, lb_netns)


@dataclass(frozen=True)
class Pair:
    """client ns --veth-- server ns; the server end is what the firewall guards."""

    client: str
    server: str
    client_if: str = "cli0"
    server_if: str = "srv0"
    client4: str = "10.201.0.1"
    server4: str = "10.201.0.2"
    client6: str = "fd20::1"
    server6: str = "fd20::2"


@pytest.fixture
def pair(make_netns) -> Pair:
    p = Pair(make_netns("cli"), make_netns("srv"))
    nsutil.veth_pair(
        p.client, p.client_if, p.server, p.server_if,
        (nsutil.Addr(p.client4, 24), nsutil.Addr(p.client6, 64)),
        (nsutil.Addr(p.server4, 24), nsutil.Addr(p.server6, 64)),
    )
    return p


@pytest.fixture
def guarded(daemon, pair):
    """Attach in a mode chosen by the test (`attach(mode, policy)`); detached at teardown."""
    api = daemon.client()
    attached: list[Pair] = []

    def attach(mode: str = "native", policy: str = "pass", **extra) -> dict:
        r = api.post("/api/v1/interfaces", json={
            "name": pair.server_if, "netns": pair.server, "mode": mode, "policy": policy, **extra})
        assert r.status_code in (200, 201), r.text
        attached.append(pair)
        return r.json()

    yield attach
    for p in attached[:1]:
        api.delete(f"/api/v1/interfaces/{p.server_if}", params={"netns": p.server})
    for rule in api.get("/api/v1/rules", params={"limit": 10000}).json()["items"]:
        api.delete(f"/api/v1/rules/{rule['id']}")
