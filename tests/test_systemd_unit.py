"""The systemd unit as `xdpfw install-service` writes it: systemd accepts it, rates it
<= 4.0, it is Type=notify with a reload, its Documentation= exists; the daemon tells
$NOTIFY_SOCKET it is ready only once the API answers; and under the unit's capabilities,
system-call filter and namespace and address-family restrictions it still loads XDP and drops
a ping (tests/unit_sandbox.py applies them: no systemd runs here)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import pytest

from tests.unit_sandbox import service_section
from xdpfw import netns as nsutil
from xdpfw.cli import main

SANDBOX = Path(__file__).parent / "unit_sandbox.py"
XDPFW_BIN = str(Path(sys.executable).parent / "xdpfw")
MAX_EXPOSURE = 4.0


def analyze(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.fail("systemd-analyze is missing: scripts/setup.sh installs Debian's systemd")
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=60)


@pytest.fixture
def unit(tmp_path, capsys) -> Path:
    cfg = tmp_path / "config.toml"
    cfg.write_text('[[interfaces]]\nname = "lo"\n')
    assert main(["install-service", "--config", str(cfg), "--unit-dir", str(tmp_path),
                 "--no-enable"]) == 0
    capsys.readouterr()
    return tmp_path / "xdpfw.service"


def test_systemd_accepts_the_unit_and_rates_it_safe(unit):
    p = analyze("verify", str(unit))
    assert p.returncode == 0 and not (p.stdout + p.stderr).strip(), (
        f"systemd-analyze verify: rc={p.returncode}\n{p.stdout}{p.stderr}\n{unit.read_text()}")
    p = analyze("security", "--offline=true", str(unit))
    m = re.search(r"Overall exposure level for xdpfw\.service: ([0-9.]+)", p.stdout)
    assert m, f"no overall exposure in:\n{p.stdout}{p.stderr}"
    exposure = float(m.group(1))
    assert exposure <= MAX_EXPOSURE, f"exposure {exposure} > {MAX_EXPOSURE}:\n{p.stdout}"


def test_unit_is_notify_reloads_by_upgrading_and_documents_itself(unit):
    svc = service_section(str(unit))
    assert svc["Type"] == ["notify"], svc["Type"]
    assert svc["ExecReload"] == [f"{XDPFW_BIN} upgrade --socket /run/xdpfw/api.sock"], svc
    docs = [line.split("=", 1)[1] for line in unit.read_text().splitlines()
            if line.startswith("Documentation=")]
    assert docs and docs[0].startswith("file://"), docs
    readme = Path(docs[0].removeprefix("file://"))
    assert readme.is_file() and readme.name == "README.md", readme
    # The daemon writes state, socket and pins: each must be writable under ProtectSystem.
    assert svc["ProtectSystem"] == ["strict"]
    assert svc["StateDirectory"] == ["xdpfw"] and svc["RuntimeDirectory"] == ["xdpfw"]
    assert svc["ReadWritePaths"] == ["/sys/fs/bpf"]
    assert "ProtectKernelModules" not in svc, "it hides /lib/modules, BCC's kernel headers"


class NotifySocket:
    """What systemd listens on for a Type=notify service."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + path[1:] if path.startswith("@") else path)
        self.address = path

    def messages(self, timeout: float) -> list[str]:
        self.sock.settimeout(timeout)
        try:
            return [self.sock.recv(4096).decode()]
        except TimeoutError:
            return []

    def close(self) -> None:
        self.sock.close()


def _answers(sock: str) -> bool:
    try:
        with httpx.Client(transport=httpx.HTTPTransport(uds=sock), timeout=2) as c:
            return c.get("http://xdpfw/healthz").status_code == 200
    except httpx.TransportError:
        return False


@pytest.mark.bpf
@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_daemon_is_ready_only_when_the_api_answers(tmp_path, abstract):
    name = f"@xdpfw-test-{uuid.uuid4().hex[:8]}" if abstract else str(tmp_path / "notify")
    listener = NotifySocket(name)
    api = str(tmp_path / "api.sock")
    pins = f"/sys/fs/bpf/xdpfw-test-{uuid.uuid4().hex[:8]}"
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [XDPFW_BIN, "serve", "--socket", api, "--state-dir", str(tmp_path / "state"),
             "--bpffs-dir", pins, "--max-rules", "65536"],
            stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "NOTIFY_SOCKET": name})
    try:
        got = listener.messages(timeout=90)
        assert got, f"no notification within 90 s:\n{log.read_text()}"
        fields = dict(line.split("=", 1) for line in got[0].splitlines())
        assert fields.get("READY") == "1", got
        assert _answers(api), "READY=1 was sent before the API answered"
        assert fields["MAINPID"] == str(proc.pid) and "guarding 0 interfaces" in fields["STATUS"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, log.read_text()
        assert "STOPPING=1" in listener.messages(timeout=5), log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        listener.close()
        shutil.rmtree(pins, ignore_errors=True)


def _ping(ns: str, addr: str) -> bool:
    p = nsutil.run_in(ns, ["ping", "-c", "2", "-i", "0.2", "-W", "1", "-q", addr], timeout=20)
    return p.returncode == 0


@pytest.mark.bpf
def test_the_hardened_unit_still_loads_xdp_and_drops(unit, tmp_path, make_netns):
    guarded, peer = make_netns("sdg"), make_netns("sdp")
    nsutil.veth_pair(guarded, "sdg0", peer, "sdp0", (nsutil.Addr("10.213.0.1", 24),),
                     (nsutil.Addr("10.213.0.2", 24),))
    assert _ping(peer, "10.213.0.1"), "no ping before anything is attached"
    api = str(tmp_path / "api.sock")
    pins = f"/sys/fs/bpf/xdpfw-test-{uuid.uuid4().hex[:8]}"
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, str(SANDBOX), str(unit), "--", XDPFW_BIN, "serve", "--socket", api,
             "--state-dir", str(tmp_path / "state"), "--bpffs-dir", pins, "--max-rules",
             "65536"], stdout=out, stderr=subprocess.STDOUT)
    try:
        assert nsutil.wait_until(lambda: _answers(api) or proc.poll() is not None, 90), \
            log.read_text()
        assert proc.poll() is None, f"the sandboxed daemon exited:\n{log.read_text()}"
        status = Path(f"/proc/{proc.pid}/status").read_text()
        assert "NoNewPrivs:\t1" in status and "Seccomp:\t2" in status, status
        with httpx.Client(transport=httpx.HTTPTransport(uds=api), base_url="http://xdpfw",
                          timeout=60) as c:
            r = c.post("/api/v1/interfaces", json={"name": "sdg0", "netns": guarded,
                                                   "mode": "generic"})
            assert r.status_code == 201, f"{r.text}\n{log.read_text()}"
            assert _ping(peer, "10.213.0.1"), "a pass policy dropped the ping"
            r = c.post("/api/v1/rules", json={"prefix": "10.213.0.2/32"})
            assert r.status_code == 201, r.text
            assert not _ping(peer, "10.213.0.1"), "the drop rule let the ping through"
            rule = c.get(r.headers["location"]).json()
            assert rule["packets"] >= 2, rule
            assert c.post("/api/v1/shutdown", json={"detach": True}).status_code == 202
        assert proc.wait(timeout=30) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        shutil.rmtree(pins, ignore_errors=True)
