"""`xdpfw` commands against a real `xdpfw serve` over its unix socket, and the local ones:
check-config, install-service, completion."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest

from conftest import require_kernel
from xdpfw import netns as nsutil
from xdpfw.cli import main

DATA = Path(__file__).parent / "data"
XDPFW_BIN = str(Path(sys.executable).parent / "xdpfw")  # the console script, as installed


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
    while True:  # every rule the test left, 10,000 per request
        _, out, _ = run("rules", "list", "--json", "--limit", "10000")
        ids = [str(r["id"]) for r in json.loads(out)["items"]]
        if not ids:
            break
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
                              "SET", "COMMENT"], out
    assert row.split() == [rid, "198.51.100.0/24", "drop", "tcp", "22", "0", "0", "-", "ssh"], out

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
    """Over a MiB: progress on stderr as the body goes, then one line of result."""
    blocklist = tmp_path / "block.txt"
    n = 60_000  # the test daemon holds 65,536
    lines = ["# test blocklist", ""] + [f"10.{i // 256 % 256}.{i % 256}.{i // 65536}/32  # n{i}"
                                       for i in range(n)]
    blocklist.write_text("\n".join(lines) + "\n")
    size = blocklist.stat().st_size
    assert size > 1 << 20

    code, out, err = xdpfw("rules", "import", str(blocklist))
    assert code == 0, err
    assert out.startswith(f"imported {n} rules from {blocklist} (ids "), out
    steps = err.splitlines()
    assert len(steps) == -(-size // (1 << 20)), err
    assert steps[-1].startswith(f"{size}/{size} bytes sent (100%)"), err
    code, out, _ = xdpfw("rules", "list", "--json", "--prefix", "10.1.0.0/32")
    assert '"total": 1' in out, out


def test_import_is_one_change_all_or_nothing(xdpfw, tmp_path):
    """Seen: an import went in chunks, each its own change, so a refused line left the lines
    before it imported. Now a file is one request: a rule that exists refuses all of it,
    and --skip-existing imports the others."""
    assert xdpfw("rules", "add", "10.9.0.3")[0] == 0
    blocklist = tmp_path / "feed.txt"
    blocklist.write_text("10.9.0.1\n10.9.0.2\n10.9.0.3\n10.9.0.4\n")
    code, out, err = xdpfw("rules", "import", str(blocklist))
    assert code == 1 and out == "", (out, err)
    assert "10.9.0.3/32 exists" in err, err
    assert '"total": 1' in xdpfw("rules", "list", "--json")[1]
    code, out, err = xdpfw("rules", "import", str(blocklist), "--skip-existing")
    assert code == 0, err
    assert out.startswith("imported 3 rules") and "1 existing skipped" in out, out
    assert '"total": 4' in xdpfw("rules", "list", "--json")[1]


def test_import_names_the_bad_line_and_imports_nothing(xdpfw, tmp_path):
    blocklist = tmp_path / "bad.txt"
    blocklist.write_text("10.1.0.0/16\n# comment\n\n10.2.0.0/33\n10.3.0.0/16\n")
    code, _, err = xdpfw("rules", "import", str(blocklist))
    assert code == 1, err
    assert err == (f"xdpfw: {blocklist}:4: '10.2.0.0/33': prefix length must be a number from "
                   "0 to 32 (nothing was sent)\n"), err
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
    assert "ok (3 interfaces, 1 rules, 0 sets)" in capsys.readouterr().out


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
    code, out, err = xdpfw("services", "add", body, "--json")
    assert code == 0, err
    svc = json.loads(out)
    sid = str(svc["id"])
    try:
        assert (svc["vip"], svc["port"], svc["forward"]) == ("10.96.100.1", 443, "tx"), svc
        code, out, err = xdpfw("services", "list", "--json")
        assert code == 0 and [s["id"] for s in json.loads(out)] == [svc["id"]], (out, err)
        code, out, err = xdpfw("services", "get", sid, "--json")
        assert code == 0 and json.loads(out)["name"] == "cli", (out, err)
        code, out, err = xdpfw("services", "backends", sid, "--json")
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
        code, out, err = xdpfw("services", "delete", sid, "--json")
    assert code == 0 and json.loads(out)["id"] == svc["id"], (out, err)
    code, _, err = xdpfw("services", "get", sid)
    assert (code, err) == (1, f"xdpfw: no service with id {sid}\n"), err


# -- what an operator saw (issue "The operator's surfaces hold up") -------------------------


def run_bin(*args: str, timeout: float = 60, env: dict | None = None
            ) -> subprocess.CompletedProcess:
    """The installed `xdpfw` in a process of its own: what an operator's shell runs."""
    return subprocess.run([XDPFW_BIN, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def test_commands_print_no_log_lines(serve):
    for args in (["rules", "list"], ["status", "--interval", "0"], ["services", "list"]):
        p = run_bin(*args, "--socket", serve.socket)
        assert p.returncode == 0 and p.stderr == "", (args, p.stdout, p.stderr)


def test_dport_zero_is_refused_not_an_any_port_rule(xdpfw):
    code, out, err = xdpfw("rules", "add", "198.51.100.0/24", "--proto", "tcp", "--dport", "0")
    assert (code, out) == (1, ""), (code, out, err)
    assert err == "xdpfw: port 0 is out of range 1-65535\n", err
    assert '"total": 0' in xdpfw("rules", "list", "--json")[1]


def test_delete_goes_on_past_a_missing_id_and_says_what_it_did(xdpfw):
    ids = []
    for prefix in ("198.51.100.0/24", "198.51.101.0/24"):
        code, out, err = xdpfw("rules", "add", prefix)
        assert code == 0, err
        ids.append(out.split()[1].rstrip(":"))
    code, out, err = xdpfw("rules", "delete", ids[0], "999999", ids[1])
    assert code == 1, (out, err)
    assert out.splitlines() == [
        f"deleted rule {ids[0]}: 198.51.100.0/24 drop (0 packets)",
        f"deleted rule {ids[1]}: 198.51.101.0/24 drop (0 packets)"], out
    assert err.splitlines() == ["xdpfw: no rule with id 999999",
                                "xdpfw: 2 of 3 rules deleted; not deleted: 999999"], err
    assert '"total": 0' in xdpfw("rules", "list", "--json")[1]


def test_watch_seconds_ends_without_events_and_says_it_samples(serve):
    t0 = time.monotonic()
    try:
        p = run_bin("watch", "--seconds", "2", "--socket", serve.socket, timeout=20)
    except subprocess.TimeoutExpired:
        pytest.fail("`xdpfw watch --seconds 2` had not returned after 20 s with no event")
    took = time.monotonic() - t0
    assert p.returncode == 0 and p.stdout == "", (p.stdout, p.stderr)
    assert 2 <= took < 10, took
    assert p.stderr.startswith("watching drop events: 1 drop in 100 is an event"), p.stderr


def test_events_rate_shows_and_sets_the_sample_rate(xdpfw, serve):
    try:
        assert xdpfw("events", "rate")[1].startswith("1 drop in 100 is an event")
        code, out, err = xdpfw("events", "rate", "7")
        assert code == 0 and out.startswith("1 drop in 7 is an event"), (out, err)
        with httpx.Client(transport=httpx.HTTPTransport(uds=serve.socket)) as c:
            assert c.get("http://xdpfw/api/v1/events/config").json()["sample_rate"] == 7
        code, out, _ = xdpfw("events", "rate", "0")
        assert out.startswith("drop events are off"), out
        code, _, err = xdpfw("events", "rate", "-1")
        assert code == 2 and "-1" in err, err
    finally:
        xdpfw("events", "rate", "100")


def test_attach_again_changes_only_what_is_given(xdpfw, make_netns):
    ns, peer = make_netns("att"), make_netns("atp")
    nsutil.veth_pair(ns, "att0", peer, "atp0")
    code, out, err = xdpfw("attach", "att0", "--netns", ns, "--mode", "generic", "--policy",
                           "drop", "--unparsed-policy", "drop", "--guard-l2")
    assert code == 0, err
    try:
        code, out, err = xdpfw("attach", "att0", "--netns", ns, "--policy", "pass")
        assert code == 0, err
        assert out == (f"guarding att0 (netns {ns}) in generic mode, policy pass (unparsed: drop,"
                       " ARP/ND guarded)\n"), out
        code, out, err = xdpfw("attach", "att0", "--netns", ns, "--no-guard-l2")
        assert code == 0 and "ARP/ND" not in out and "unparsed: drop" in out, (out, err)
    finally:
        assert xdpfw("detach", "att0", "--netns", ns)[0] == 0


def test_upgrade_source_missing_is_a_usage_error(xdpfw, tmp_path):
    code, out, err = xdpfw("upgrade", "--source", str(tmp_path / "missing.c"))
    assert code == 2 and out == "", (code, out, err)
    assert "missing.c' does not exist" in err, err


def test_uploaded_source_that_does_not_build_is_422_not_500(serve, tmp_path):
    with httpx.Client(transport=httpx.HTTPTransport(uds=serve.socket), timeout=120) as c:
        r = c.post("http://xdpfw/api/v1/program/reload",
                   json={"source_text": "int main( {\n", "source_name": "broken.c"})
    assert r.status_code == 422, r.text
    assert r.json()["detail"].startswith("BCC could not compile broken.c"), r.text


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == "xdpfw, version 0.1.0\n"


def test_shell_completion():
    p = run_bin("completion", "bash")
    assert p.returncode == 0 and "_XDPFW_COMPLETE=bash_complete" in p.stdout, p.stdout
    p = run_bin(env={"_XDPFW_COMPLETE": "bash_complete", "COMP_WORDS": "xdpfw rules de",
                     "COMP_CWORD": "2"})
    assert p.returncode == 0 and p.stdout.split() == ["plain,delete"], (p.stdout, p.stderr)
    p = run_bin(env={"_XDPFW_COMPLETE": "bash_complete", "COMP_WORDS": "xdpfw attach x --po",
                     "COMP_CWORD": "3"})
    assert p.stdout.split() == ["plain,--policy"], (p.stdout, p.stderr)


def test_services_are_tables(xdpfw):
    code, out, err = xdpfw("services", "add", '{"name": "tbl", "vip": "10.96.100.2", '
                           '"port": 80}')
    assert code == 0, err
    assert out.startswith("service ") and "10.96.100.2:80 tcp, forward tx, 0 backends" in out
    sid = out.split()[1].rstrip(":")
    try:
        code, out, err = xdpfw("services", "list")
        header, row = out.splitlines()[:2]
        assert header.split() == ["ID", "NAME", "VIP", "PROTO", "FORWARD", "IN", "TABLE",
                                  "BACKENDS", "FORWARDED", "NO", "BACKEND"], out
        assert row.split() == [sid, "tbl", "10.96.100.2:80", "tcp", "tx", "0", "0", "0",
                               "0"], out
        code, out, err = xdpfw("services", "get", sid)
        assert code == 0 and "10.96.100.2:80" in out and "{" not in out, (out, err)
    finally:
        code, out, err = xdpfw("services", "delete", sid)
    assert code == 0 and out == f"deleted service {sid}: 10.96.100.2:80 tcp\n", (out, err)


# -- sets, export/import, explain, audit, bulk delete, declared rules ------------------------


def _ids_of(xdpfw, **params) -> list[int]:
    args = [a for k, v in params.items() for a in (f"--{k}", v)]
    _, out, _ = xdpfw("rules", "list", "--json", "--limit", "10000", *args)
    return [r["id"] for r in json.loads(out)["items"]]


def test_sets_replace_prints_the_difference_and_keeps_what_stays(xdpfw, tmp_path):
    feed = tmp_path / "feed.txt"
    feed.write_text("192.0.2.0/24\n198.51.100.7\n203.0.113.0/25\n")
    code, out, err = xdpfw("sets", "replace", "feed", str(feed))
    assert code == 0, err
    assert out.startswith("set feed: 3 added, 0 removed, 0 changed, 0 kept (ids "), out
    kept_id = _ids_of(xdpfw, prefix="192.0.2.0/24")

    feed.write_text("192.0.2.0/24\n203.0.113.128/25\n")
    code, out, err = xdpfw("sets", "replace", "feed", str(feed), "--dry-run")
    assert code == 0, err
    assert out.splitlines()[0] == ("set feed: 1 would be added, 2 would be removed, 0 would be "
                                   "changed, 1 kept (dry run: nothing changed)"), out
    assert len(_ids_of(xdpfw, set="feed")) == 3
    code, out, err = xdpfw("sets", "replace", "feed", str(feed))
    assert code == 0 and out.startswith("set feed: 1 added, 2 removed, 0 changed, 1 kept"), out
    assert _ids_of(xdpfw, prefix="192.0.2.0/24") == kept_id, "a kept rule got a new id"

    code, out, _ = xdpfw("sets", "list")
    assert out.splitlines()[1].split() == ["feed", "2"], out
    code, out, err = xdpfw("sets", "delete", "feed")
    assert (code, out) == (0, "deleted set feed: 2 rules\n"), (out, err)
    assert _ids_of(xdpfw) == []


def test_export_then_import_replace_gives_the_same_rules(xdpfw, tmp_path):
    for args in (["10.20.0.0/16", "--comment", "lab net"],
                 ["10.21.0.0/16", "--action", "pass", "--proto", "tcp", "--dport", "22"],
                 ["2001:db8:20::/48", "--proto", "udp", "--comment", "v6 feed"]):
        assert xdpfw("rules", "add", *args)[0] == 0
    feed = tmp_path / "feed.txt"
    feed.write_text("192.0.2.0/24\n198.51.100.0/24\n")
    assert xdpfw("sets", "replace", "partners", str(feed), "--action", "pass")[0] == 0
    code, text, err = xdpfw("rules", "export")
    assert code == 0 and text.startswith("# xdpfw rules export: 5 rules"), (text, err)
    code, js, _ = xdpfw("rules", "export", "--format", "json")
    assert json.loads(js)["format"] == "xdpfw-rules"
    saved = tmp_path / "rules.txt"
    saved.write_text(text)
    saved_json = tmp_path / "rules.json"
    saved_json.write_text(js)

    # Change things: one rule gone, one new, one set emptied.
    ids = _ids_of(xdpfw, prefix="10.20.0.0/16")
    assert xdpfw("rules", "delete", str(ids[0]))[0] == 0
    assert xdpfw("rules", "add", "10.99.0.0/16")[0] == 0
    assert xdpfw("sets", "delete", "partners")[0] == 0

    code, out, err = xdpfw("rules", "import", str(saved), "--replace")
    assert code == 0, err
    assert out.startswith(f"rules from {saved}: 3 added, 1 removed, 0 changed, 2 kept"), out
    assert xdpfw("rules", "export")[1] == text
    code, out, err = xdpfw("rules", "import", str(saved_json), "--replace")
    assert code == 0 and ": 0 added, 0 removed, 0 changed, 5 kept" in out, (out, err)


def test_explain_and_covering_find_the_rule_that_decides(xdpfw):
    """Seen: `rules list --prefix 38.158.13.5` found nothing although 38.158.13.0/24 covers
    the address; no command said which rule decides for it."""
    assert xdpfw("rules", "add", "38.158.0.0/16", "--action", "pass")[0] == 0
    assert xdpfw("rules", "add", "38.158.13.0/24", "--proto", "tcp", "--dport", "22")[0] == 0
    code, out, err = xdpfw("rules", "list", "--covering", "38.158.13.5")
    assert code == 0, err
    rows = [line.split()[1] for line in out.splitlines()[1:]]
    assert rows == ["38.158.13.0/24", "38.158.0.0/16"], out

    code, out, err = xdpfw("explain", "38.158.13.5", "tcp/22")
    assert code == 0, err
    first = out.splitlines()[0]
    assert first.startswith("tcp/22 from 38.158.13.5 to ") and ": drop (" in first, out
    assert "decided by rule" in first and "38.158.13.0/24 tcp port 22 drop" in first, out
    code, out, _ = xdpfw("explain", "38.158.13.5", "udp/53")
    assert ": pass (" in out.splitlines()[0] and "38.158.0.0/16 pass" in out, out
    code, out, _ = xdpfw("explain", "192.0.2.1")
    assert "decided by the pass policy" in out and "no rule covers the address" in out, out
    code, _, err = xdpfw("explain", "192.0.2.1", "sctp/9")
    assert code == 2 and "tcp/PORT, udp/PORT" in err, err


def test_bulk_delete_is_one_request_by_ids_set_or_comment(xdpfw, tmp_path):
    """Seen: 1,000 deletes were 1,000 requests."""
    feed = tmp_path / "feed.txt"
    feed.write_text("".join(f"10.30.{i}.0/24\n" for i in range(200)))
    assert xdpfw("rules", "import", str(feed), "--comment", "batch a")[0] == 0
    code, _, err = xdpfw("sets", "replace", "s1", str(feed))
    assert code == 1 and "cannot take it over" in err, err  # matches outside the set
    ids = _ids_of(xdpfw, comment="batch a")
    code, out, err = xdpfw("rules", "delete", *map(str, ids[:150]))
    assert (code, out) == (0, "deleted 150 rules\n"), (out, err)
    code, out, err = xdpfw("rules", "delete", "--comment", "batch a")
    assert (code, out) == (0, "deleted 50 rules\n"), (out, err)
    assert xdpfw("rules", "add", "10.31.0.0/16")[0] == 0  # no comment
    code, out, err = xdpfw("rules", "delete", "--comment", "")
    assert (code, out) == (0, "deleted 1 rules\n"), (out, err)
    code, _, err = xdpfw("rules", "delete", "1", "--set", "x")
    assert code == 2 and "one of them" in err, err


def test_audit_names_each_change_and_its_client(xdpfw):
    since = str(time.time() - 1)
    assert xdpfw("rules", "add", "10.40.0.0/16", "--comment", "audited")[0] == 0
    code, out, err = xdpfw("audit", "--since", since, "--json")
    assert code == 0, err
    records = json.loads(out)
    assert any("10.40.0.0/16" in r["detail"] and r["client"].startswith(f"uid {os.getuid()} ")
               for r in records), records
    code, out, _ = xdpfw("audit", "--since", since)
    assert out.splitlines()[0].split()[:2] == ["ID", "TIME"], out


def test_check_config_diff_and_reload_without_declared_rules(xdpfw, serve, tmp_path, capsys):
    assert xdpfw("rules", "add", "10.50.0.0/16")[0] == 0
    cfg = tmp_path / "xdpfw.toml"
    feed = tmp_path / "feed.txt"
    feed.write_text("192.0.2.0/24\n")
    cfg.write_text('[[rules]]\nprefix = "10.51.0.0/16"\n\n'
                   '[[sets]]\nname = "feed"\nfile = "feed.txt"\n')
    code, out, err = xdpfw("check-config", str(cfg), "--no-interfaces", "--diff")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == f"{cfg}: ok (0 interfaces, 2 rules, 1 sets)", out
    assert lines[1].startswith("the running rules, made the file's: 2 would be added, 1 would "
                               "be removed"), out
    assert _ids_of(xdpfw) != [] and len(_ids_of(xdpfw)) == 1, "--diff changed the rules"
    code, out, err = xdpfw("reload")
    assert code == 1 and "rules_from_config is off" in err, (out, err)
