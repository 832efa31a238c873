"""`xdpfw` commands against a real `xdpfw serve` over its unix socket (no interface needed),
and the local ones: check-config, install-service."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest

from conftest import require_kernel
from xdpfw.cli import main

DATA = Path(__file__).parent / "data"


class Serve:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.socket = str(workdir / "api.sock")
        self.state = str(workdir / "state")
        self.pins = f"/sys/fs/bpf/xdpfw-test-{uuid.uuid4().hex[:8]}"
        self.log = workdir / "serve.log"
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "xdpfw", "serve", "--socket", self.socket, "--state-dir",
                 self.state, "--bpffs-dir", self.pins, "--max-rules", "65536"],
                stdout=log, stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"xdpfw serve exited:\n{self.log.read_text()}"
            try:
                with httpx.Client(transport=httpx.HTTPTransport(uds=self.socket)) as c:
                    if c.get("http://xdpfw/healthz").status_code == 200:
                        return
            except httpx.TransportError:
                time.sleep(0.1)
        raise AssertionError(f"xdpfw serve did not answer:\n{self.log.read_text()}")

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)
        shutil.rmtree(self.pins, ignore_errors=True)


@pytest.fixture(scope="module")
def serve(tmp_path_factory):
    require_kernel()
    s = Serve(tmp_path_factory.mktemp("cli"))
    yield s
    s.close()


@pytest.fixture
def xdpfw(serve, capsys):
    """Run `xdpfw ARGS --socket <the test daemon>` in-process: (exit code, stdout, stderr)."""

    def run(*args: str, socket: bool = True) -> tuple[int, str, str]:
        argv = [*args, "--socket", serve.socket] if socket else list(args)
        code = main(argv)
        out, err = capsys.readouterr()
        return code, out, err

    yield run
    _, out, _ = run("rules", "list", "--json", "--limit", "10000")
    ids = [str(r["id"]) for r in json.loads(out)["items"]]
    if ids:
        run("rules", "delete", *ids)


pytestmark = pytest.mark.bpf


def test_rules_add_list_delete(xdpfw):
    code, out, err = xdpfw("rules", "add", "198.51.100.0/24", "--proto", "tcp", "--dport", "22",
                           "--comment", "ssh")
    assert code == 0, err
    assert out.startswith("rule ") and "198.51.100.0/24 tcp port 22 drop" in out, out
    rid = out.split()[1].rstrip(":")

    code, out, err = xdpfw("rules", "list")
    assert code == 0, err
    header, row = out.splitlines()[:2]
    assert header.split() == ["ID", "PREFIX", "ACTION", "PROTO", "DPORT", "PACKETS", "BYTES",
                              "COMMENT"], out
    assert row.split() == [rid, "198.51.100.0/24", "drop", "tcp", "22", "0", "0", "ssh"], out

    code, out, err = xdpfw("rules", "delete", rid)
    assert code == 0 and f"deleted rule {rid}" in out, (out, err)


def test_api_errors_are_one_line_and_fail(xdpfw):
    assert xdpfw("rules", "add", "192.0.2.0/24")[0] == 0
    code, out, err = xdpfw("rules", "add", "192.0.2.0/24")
    assert code == 1 and out == "", (code, out, err)
    assert err.count("\n") == 1 and err.startswith("xdpfw: a rule for 192.0.2.0/24 exists"), err

    code, _, err = xdpfw("rules", "add", "192.0.2.1/24")
    assert code == 1 and err.count("\n") == 1 and "host bits set" in err, err

    code, _, err = xdpfw("rules", "delete", "999999")
    assert (code, err) == (1, "xdpfw: no rule with id 999999\n")


def test_unreachable_daemon_is_one_line(xdpfw, tmp_path):
    code, _, err = xdpfw("rules", "list", "--socket", str(tmp_path / "none.sock"), socket=False)
    assert code == 1 and err.count("\n") == 1 and "is `xdpfw serve` running?" in err, err


def test_import_blocklist_with_progress(xdpfw, tmp_path):
    blocklist = tmp_path / "block.txt"
    lines = ["# test blocklist", ""] + [f"10.{i // 256}.{i % 256}.0/24  # n{i}" for i in range(250)]
    blocklist.write_text("\n".join(lines) + "\n")

    code, out, err = xdpfw("rules", "import", str(blocklist), "--chunk", "100")
    assert code == 0, err
    assert "imported 250 rules" in out, out
    assert err.splitlines() == [f"{n}/250 rules ({100 * n // 250}%)" + line.split(")", 1)[1]
                                for n, line in zip((100, 200, 250), err.splitlines(),
                                                   strict=True)], err
    code, out, _ = xdpfw("rules", "list", "--json", "--prefix", "10.0.249.0/24")
    assert '"total": 1' in out, out


def test_import_names_the_bad_line_and_imports_nothing(xdpfw, tmp_path):
    blocklist = tmp_path / "bad.txt"
    blocklist.write_text("10.1.0.0/16\n# comment\n\n10.2.0.0/33\n10.3.0.0/16\n")
    code, _, err = xdpfw("rules", "import", str(blocklist))
    assert code == 1, err
    assert err == (f"xdpfw: {blocklist}:4: '10.2.0.0/33': prefix length must be a number from "
                   "0 to 32 (nothing was imported)\n"), err
    assert '"total": 0' in xdpfw("rules", "list", "--json")[1]


def test_status_shows_program_and_counters(xdpfw):
    code, out, err = xdpfw("status", "--interval", "0")
    assert code == 0, err
    assert out.startswith("program id ") and "REASON" in out and "rule_drop" in out, out


def test_upgrade_with_a_bad_build_prints_the_verifier_log(xdpfw):
    before = xdpfw("status", "--json", "--interval", "0")[1]
    code, out, err = xdpfw("upgrade", "--source", str(DATA / "xdpfw_oob.c"))
    assert code == 1, (out, err)
    assert "invalid access to packet" in err, err
    assert err.splitlines()[-1].startswith("xdpfw: the verifier rejected xdpfw_main"), err
    after = xdpfw("status", "--json", "--interval", "0")[1]
    assert json.loads(after)["program"]["id"] == json.loads(before)["program"]["id"]


# -- local commands ----------------------------------------------------------------------


def test_check_config_names_the_line(tmp_path, capsys):
    cfg = tmp_path / "xdpfw.toml"
    cfg.write_text(
        '[api]\nsocket = "/run/xdpfw/api.sock"\n\n'
        '[[interfaces]]\nname = "lo"\n\n'
        '[[interfaces]]\nname = "xdpfw-nonesuch"\npolicy = "drop"\n\n'
        '[[interfaces]]\nname = "lo"\nmode = "turbo"\n\n'
        '[[rules]]\nprefix = "10.0.0.1/8"\n'
    )
    assert main(["check-config", str(cfg)]) == 1
    err = capsys.readouterr().err
    assert f"{cfg}:13: interfaces[2].mode: Input should be 'auto', 'native', 'generic' or " \
           "'offload' (got 'turbo')" in err, err
    assert f"{cfg}:16: rules[0].prefix: '10.0.0.1/8' has host bits set" in err, err

    cfg.write_text(cfg.read_text().replace("turbo", "generic").replace("10.0.0.1/8", "10.0.0.0/8"))
    assert main(["check-config", str(cfg)]) == 1
    err = capsys.readouterr().err
    assert err == f"xdpfw: {cfg}:8: interfaces[1]: unknown interface 'xdpfw-nonesuch' in the " \
                  "host namespace\n", err

    assert main(["check-config", str(cfg), "--no-interfaces"]) == 0
    assert "ok (3 interfaces, 1 rules)" in capsys.readouterr().out


def test_install_service_writes_a_unit_systemd_accepts(tmp_path, capsys):
    cfg = tmp_path / "config.toml"
    cfg.write_text('[[interfaces]]\nname = "lo"\n')
    assert main(["install-service", "--config", str(cfg), "--unit-dir", str(tmp_path),
                 "--no-enable"]) == 0
    unit = (tmp_path / "xdpfw.service").read_text()
    xdpfw_bin = str(Path(sys.executable).parent / "xdpfw")
    assert f"ExecStart={xdpfw_bin} serve --config {cfg}" in unit, unit
    assert f"ExecStartPre={xdpfw_bin} check-config {cfg}" in unit, unit
    assert "Restart=on-failure" in unit and "After=network-online.target" in unit, unit
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    p = subprocess.run([analyze, "verify", str(tmp_path / "xdpfw.service")],
                       capture_output=True, text=True)
    assert p.returncode == 0 and not p.stdout.strip() and not p.stderr.strip(), (
        f"systemd-analyze verify: rc={p.returncode}\n{p.stdout}{p.stderr}\n{unit}"
    )


def test_services_commands_reach_the_real_routes(xdpfw):
    body = '{"name": "cli", "vip": "10.96.100.1", "port": 443}'
    code, out, err = xdpfw("services", "add", body)
    assert code == 0, err
    svc = json.loads(out)
    sid = str(svc["id"])
    try:
        assert (svc["vip"], svc["port"], svc["forward"]) == ("10.96.100.1", 443, "tx"), svc
        code, out, err = xdpfw("services", "list")
        assert code == 0 and [s["id"] for s in json.loads(out)] == [svc["id"]], (out, err)
        code, out, err = xdpfw("services", "get", sid)
        assert code == 0 and json.loads(out)["name"] == "cli", (out, err)
        code, out, err = xdpfw("services", "backends", sid)
        assert code == 0 and json.loads(out) == [], (out, err)

        code, out, err = xdpfw("services", "add", body)
        assert code == 1 and out == "" and err.count("\n") == 1, (code, out, err)
        assert err.startswith("xdpfw: service 10.96.100.1 tcp port 443 exists already"), err
        code, _, err = xdpfw("services", "add", "{not json")
        assert code == 1 and err.startswith("xdpfw: the body is not JSON"), err
        # 192.0.2.0/24 (TEST-NET-1) answers no ARP here: the API refuses, the CLI says why.
        code, _, err = xdpfw("services", "add-backend", sid, '{"address": "192.0.2.77"}')
        assert code == 1 and err.count("\n") == 1 and "192.0.2.77" in err, err
        code, _, err = xdpfw("services", "update-backend", sid, "999999", "--weight", "2")
        assert (code, err) == (1, f"xdpfw: service {sid} has no backend with id 999999\n"), err
        code, _, err = xdpfw("services", "delete-backend", sid, "999999")
        assert code == 1 and "999999" in err, err
    finally:
        code, out, err = xdpfw("services", "delete", sid)
    assert code == 0 and json.loads(out)["id"] == svc["id"], (out, err)
    code, _, err = xdpfw("services", "get", sid)
    assert (code, err) == (1, f"xdpfw: no service with id {sid}\n"), err
