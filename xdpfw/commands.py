"""The operator's commands of `xdpfw`: they talk to a running daemon over its unix socket
(xdpfw.client), plus the local ones that need no daemon (check-config, install-service).

Output is for people: tables and one-line errors (xdpfw.cli prints XdpfwError as
`xdpfw: <message>` and exits 1). `--json` gives the API's answer as is, for scripts.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import click

from xdpfw.cli_options import json_option, socket_option
from xdpfw.cli_output import print_json, si, table
from xdpfw.client import ApiError, ApiUnavailable, Client, default_socket
from xdpfw.errors import XdpfwError

REPO = Path(__file__).resolve().parent.parent
UNIT_TEMPLATE = REPO / "scripts" / "xdpfw.service"
README = REPO / "README.md"
TEMPLATE_BIN, TEMPLATE_CONFIG = "/usr/local/bin/xdpfw", "/etc/xdpfw/config.toml"
TEMPLATE_DOC = "file:///opt/xdpfw/README.md"


# -- interfaces, status --------------------------------------------------------------------

POLICY = click.Choice(["pass", "drop"])


@click.command()
@click.argument("ifname")
@click.option("--netns", help="the network namespace the interface is in")
@click.option("--mode", type=click.Choice(["auto", "native", "generic", "offload"]),
              help="XDP mode [new interface: auto]")
@click.option("--policy", type=POLICY, help="packets no rule decides [new interface: pass]")
@click.option("--unparsed-policy", type=POLICY,
              help="packets the parser cannot read [new interface: pass]")
@click.option("--guard-l2/--no-guard-l2", default=None,
              help="a drop policy drops ARP/ND too [new interface: no]")
@click.option("--chain-prog-id", type=int,
              help="run this loaded XDP program (bpftool prog id) after xdpfw's passes")
@click.option("--no-chain", is_flag=True,
              help="refuse to attach over another XDP program instead of chaining it")
@socket_option
def attach(ifname, netns, mode, policy, unparsed_policy, guard_l2, chain_prog_id, no_chain,
           socket) -> int:
    """Guard an interface, or change how a guarded one is guarded: only the options given
    change, the others keep their current values."""
    given = {"mode": mode, "policy": policy, "unparsed_policy": unparsed_policy,
             "guard_l2": guard_l2, "chain_prog_id": chain_prog_id}
    body = {"name": ifname, "netns": netns, **{k: v for k, v in given.items() if v is not None}}
    if no_chain:
        body["chain_existing"] = False
    with Client(socket) as c:
        r = c.post("/api/v1/interfaces", json=body)
    ns = f" (netns {r['netns']})" if r["netns"] else ""
    chained = f", then program {r['chained_prog_id']}" if r.get("chained_prog_id") else ""
    l2 = ", ARP/ND guarded" if r["guard_l2"] else ""
    print(f"guarding {r['name']}{ns} in {r['mode_in_use']} mode, policy {r['policy']} "
          f"(unparsed: {r['unparsed_policy']}{l2}){chained}")
    return 0


@click.command()
@click.argument("ifname")
@click.option("--netns")
@socket_option
def detach(ifname, netns, socket) -> int:
    """Stop guarding an interface."""
    params = {"netns": netns} if netns else None
    with Client(socket) as c:
        r = c.delete(f"/api/v1/interfaces/{ifname}", params=params)
    print(f"detached {r['name']}" + (f" (netns {r['netns']})" if r["netns"] else ""))
    return 0


@click.command()
@click.option("--interval", type=float, default=1.0, show_default=True,
              help="seconds between the two samples rates come from (0: no rates)")
@socket_option
@json_option
def status(interval, socket, as_json) -> int:
    """Program, interfaces, modes, counters and rates."""
    with Client(socket) as c:
        prog = c.get("/api/v1/program")
        health = c.get("/healthz")
        first = c.get("/api/v1/stats")
        t0 = time.monotonic()
        second = first
        if interval > 0:
            time.sleep(interval)
            second = c.get("/api/v1/stats")
        dt = max(time.monotonic() - t0, 1e-6)
    if as_json:
        print_json({"program": prog, "health": health, "stats": second})
        return 0
    print(f"program id {prog['id']} (tag {prog['tag']}), {health['rules']} rules, "
          f"{health['interfaces']} interfaces")
    attached = {(i["name"], i["netns"]): i for i in prog["interfaces"]}
    before = {(i["name"], i["netns"]): i for i in first["interfaces"]}
    rows = []
    for i in second["interfaces"]:
        key = (i["name"], i["netns"])
        b = before.get(key, i)
        a = attached.get(key, {})
        state = "guarding" if a.get("current") else f"NOT GUARDED (prog {a.get('prog_id')})"
        rows.append([i["name"], i["netns"] or "-", i["mode"], state,
                     i["passed"]["packets"], i["dropped"]["packets"],
                     si((i["passed"]["packets"] - b["passed"]["packets"]) / dt),
                     si((i["dropped"]["packets"] - b["dropped"]["packets"]) / dt)])
    numbers = ["PASSED", "DROPPED", "PASS/S", "DROP/S"]
    table(rows, ["INTERFACE", "NETNS", "MODE", "STATE", *numbers], right=numbers)
    print()
    rows = []
    for name, v in second["actions"].items():
        prev = first["actions"].get(name, v)
        rows.append([name, v["packets"], v["bytes"], si((v["packets"] - prev["packets"]) / dt)])
    table(rows, ["REASON", "PACKETS", "BYTES", "PKT/S"], right=["PACKETS", "BYTES", "PKT/S"])
    return 0


@click.command()
@click.option("--timeout", type=float, default=5.0, show_default=True)
@socket_option
def health(timeout, socket) -> int:
    """Exit 0 if the daemon's API answers /healthz (for container health checks)."""
    with Client(socket, timeout=timeout) as c:
        h = c.get("/healthz")
    print(f"{h['status']}: {h['rules']} rules, {h['interfaces']} interfaces")
    return 0


# -- events --------------------------------------------------------------------------------


def format_event(e: dict) -> str:
    src = e["saddr"] if not e.get("sport") else _hostport(e["saddr"], e["sport"])
    dst = e["daddr"] if not e.get("dport") else _hostport(e["daddr"], e["dport"])
    rule = f"rule {e['rule_id']}" if e.get("rule_id") is not None else "no rule"
    iface = e.get("interface") or f"interface slot {e['iface_slot']}"
    ns = f" (netns {e['netns']})" if e.get("netns") else ""
    when = time.strftime("%H:%M:%S", time.localtime(e.get("time", time.time())))
    return (f"{when} {e['action']} {e['proto']} {src} -> {dst} on {iface}{ns}: "
            f"{e['reason']}, {rule} ({e['len']} bytes)")


def _hostport(addr: str, port: int) -> str:
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


def _sampling(rate: int) -> str:
    if rate == 0:
        return "drop events are off (sample rate 0): none will come; `xdpfw events rate N` " \
               "turns them on"
    if rate == 1:
        return "every drop is an event (sample rate 1)"
    return f"1 drop in {rate} is an event (sample rate {rate}; `xdpfw events rate N` changes it)"


_END = object()


@click.command()
@click.option("--count", type=int, default=0, help="exit after this many events")
@click.option("--seconds", type=float, default=0, help="exit after this long, events or not")
@socket_option
@json_option
def watch(count, seconds, socket, as_json) -> int:
    """Print sampled drop events live."""
    with Client(socket) as c:
        rate = c.get("/api/v1/events/config")["sample_rate"]
    print(f"watching drop events: {_sampling(rate)}", file=sys.stderr, flush=True)
    # The stream is read on a thread, so that --seconds holds even when no event (not even a
    # keep-alive) comes: the main thread waits on the queue with the time that is left.
    events: queue.Queue = queue.Queue()
    client = Client(socket)

    def read() -> None:
        try:
            for event in client.events():
                events.put(event)
        except BaseException as e:
            events.put(e)
        finally:
            events.put(_END)

    threading.Thread(target=read, name="xdpfw-watch", daemon=True).start()
    deadline = time.monotonic() + seconds if seconds else None
    n = 0
    try:
        while True:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                break
            try:
                item = events.get(timeout=left)
            except queue.Empty:
                break
            if item is _END:
                break
            if isinstance(item, BaseException):
                if isinstance(item, ApiUnavailable) and n and seconds:
                    break  # the daemon went away after we saw events: a normal end
                raise item
            if item.get("type") == "lagged":
                print(f"(missed {item['missed']} events: this client was too slow)",
                      file=sys.stderr, flush=True)
                continue
            print(json.dumps(item) if as_json else format_event(item), flush=True)
            n += 1
            if count and n >= count:
                break
    except KeyboardInterrupt:
        pass
    finally:
        client.close()  # ends the reader's blocking read
    return 0


@click.group()
def events() -> None:
    """Drop events: their sample rate."""


@events.command("rate")
@click.argument("n", type=click.IntRange(min=0), required=False)
@socket_option
def events_rate(n, socket) -> int:
    """Show the drop-event sample rate, or set it to N (1 drop in N; 0 turns events off)."""
    with Client(socket) as c:
        if n is None:
            r = c.get("/api/v1/events/config")
        else:
            r = c.put("/api/v1/events/config", json={"sample_rate": n})
    print(_sampling(r["sample_rate"]))
    return 0


# -- program, lifecycle --------------------------------------------------------------------


@click.command()
@click.option("--source", type=click.Path(exists=True, dir_okay=False, readable=True),
              help="C source to build instead of the installed xdpfw.c")
@socket_option
def upgrade(source, socket) -> int:
    """Build the program again and swap it in atomically on every interface."""
    body = {}
    if source:  # read here, with the caller's permissions: the daemon reads no path
        path = Path(source)
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", path.stem)[:60].lstrip(".-") or "upload"
        body = {"source_text": path.read_text(), "source_name": f"{name}.c"}
    with Client(socket, timeout=300.0) as c:
        try:
            r = c.post("/api/v1/program/reload", json=body)
        except ApiError as e:
            # The compiler's or verifier's log follows the one-line reason: the operator
            # needs it.
            rest = e.detail.split("\n", 1)[1:] if "\n" in e.detail else []
            if rest:
                print(rest[0].rstrip(), file=sys.stderr)
            raise
    print(f"program upgraded: build {r['old_id']} -> {r['new_id']} on {r['interfaces']} "
          "interfaces (maps kept)")
    for s in r.get("swapped", []):
        where = f"{s['name']} (netns {s['netns']})" if s["netns"] else s["name"]
        print(f"  {where}: id {s['old_id']} -> {s['new_id']}")
    return 0


@click.command()
@click.option("--detach", is_flag=True,
              help="also detach every interface and remove the pinned maps")
@click.option("--state-dir", default="/var/lib/xdpfw", show_default=True,
              help="where the pid file is")
@click.option("--timeout", type=float, default=30.0, show_default=True)
@socket_option
def stop(detach, state_dir, timeout, socket) -> int:
    """Stop the daemon (the data plane keeps guarding unless --detach).

    Asks the API, then waits until the daemon has exited. If the API does not answer, falls
    back to SIGTERM through the pid file: only to a pid that is an `xdpfw serve` in this pid
    namespace (a daemon in a container wrote its own namespace's pid)."""
    pid = daemon_pid(state_dir)
    sock = socket or default_socket()
    try:
        with Client(socket) as c:
            c.post("/api/v1/shutdown", json={"detach": detach})
    except ApiUnavailable:
        if detach or pid is None:
            raise
        os.kill(pid, signal.SIGTERM)
    gone = _wait(lambda: not os.path.exists(sock) and (pid is None or not _alive(pid)),
                 timeout)
    if not gone:
        raise XdpfwError(f"the daemon did not exit within {timeout}s")
    print("stopped; " + ("interfaces detached and pins removed" if detach
                         else "the data plane keeps guarding"))
    return 0


def daemon_pid(state_dir: str) -> int | None:
    """The pid in the state directory's pid file, if it names an `xdpfw serve` that this
    process can see as such: same pid namespace, and that command line."""
    try:
        lines = (Path(state_dir) / "xdpfw.pid").read_text().split()
        pid = int(lines[0])
    except (OSError, ValueError, IndexError):
        return None
    if len(lines) > 1 and lines[1] != _pid_ns():
        return None  # written in another pid namespace: the number means another process
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    if not any(b"xdpfw" in a for a in argv) or b"serve" not in argv:
        return None  # stale: the pid was reused
    return pid


def _pid_ns() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return "?"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (our own child in tests) has exited.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _wait(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


# -- services (load balancer) --------------------------------------------------------------


def _json_arg(text: str) -> dict:
    try:
        return json.loads(text)
    except ValueError as e:
        raise XdpfwError(f"the body is not JSON ({e}): {text!r}") from None


def _service_rows(svcs: list[dict]) -> None:
    table(([s["id"], s["name"] or "-", _hostport(s["vip"], s["port"]), s["proto"], s["forward"],
            sum(1 for b in s["backends"] if b["in_table"]), len(s["backends"]),
            s["forwarded"]["packets"], s["no_backend"]["packets"]] for s in svcs),
          ["ID", "NAME", "VIP", "PROTO", "FORWARD", "IN TABLE", "BACKENDS", "FORWARDED",
           "NO BACKEND"], right=["ID", "IN TABLE", "BACKENDS", "FORWARDED", "NO BACKEND"])


def _backend_rows(bes: list[dict]) -> None:
    def health(b: dict) -> str:
        if not b["resolved"]:
            return f"unresolved: {b['error']}"
        return "healthy" if b["healthy"] else f"unhealthy: {b['health_error']}"

    table(([b["id"], b["address"], b["weight"], b["state"], health(b), f"{b['share']:.1%}",
            b["traffic"]["packets"]] for b in bes),
          ["ID", "ADDRESS", "WEIGHT", "STATE", "HEALTH", "SHARE", "PACKETS"],
          right=["ID", "WEIGHT", "SHARE", "PACKETS"])


def _show(r, as_json: bool, render: Callable[[], None]) -> int:
    if as_json:
        print_json(r)
    else:
        render()
    return 0


@click.group()
def services() -> None:
    """Load-balancer services and their backends (tables; --json for the API's answer)."""


@services.command("list")
@socket_option
@json_option
def services_list(socket, as_json) -> int:
    """List services."""
    with Client(socket) as c:
        r = c.get("/api/v1/services")
    return _show(r, as_json, lambda: _service_rows(r))


@services.command("get")
@click.argument("service_id")
@socket_option
@json_option
def services_get(service_id, socket, as_json) -> int:
    """One service and its backends."""
    with Client(socket) as c:
        r = c.get(f"/api/v1/services/{service_id}")

    def render() -> None:
        _service_rows([r])
        if r["backends"]:
            print()
            _backend_rows(r["backends"])

    return _show(r, as_json, render)


@services.command("add")
@click.argument("body")
@socket_option
@json_option
def services_add(body, socket, as_json) -> int:
    """Add a service given as JSON (see POST /api/v1/services in /docs)."""
    with Client(socket) as c:
        r = c.post("/api/v1/services", json=_json_arg(body))
    return _show(r, as_json, lambda: print(
        f"service {r['id']}: {_hostport(r['vip'], r['port'])} {r['proto']}, forward "
        f"{r['forward']}, {len(r['backends'])} backends"))


@services.command("delete")
@click.argument("service_id")
@socket_option
@json_option
def services_delete(service_id, socket, as_json) -> int:
    """Delete a service."""
    with Client(socket) as c:
        r = c.delete(f"/api/v1/services/{service_id}")
    return _show(r, as_json, lambda: print(
        f"deleted service {r['id']}: {_hostport(r['vip'], r['port'])} {r['proto']}"))


@services.command("backends")
@click.argument("service_id")
@socket_option
@json_option
def services_backends(service_id, socket, as_json) -> int:
    """List a service's backends."""
    with Client(socket) as c:
        r = c.get(f"/api/v1/services/{service_id}/backends")
    return _show(r, as_json, lambda: _backend_rows(r))


@services.command("add-backend")
@click.argument("service_id")
@click.argument("body")
@socket_option
@json_option
def services_add_backend(service_id, body, socket, as_json) -> int:
    """Add a backend given as JSON, e.g. '{"address": "10.0.0.2", "weight": 2}'."""
    with Client(socket) as c:
        r = c.post(f"/api/v1/services/{service_id}/backends", json=_json_arg(body))
    return _show(r, as_json, lambda: _backend_rows([r]))


@services.command("update-backend")
@click.argument("service_id")
@click.argument("backend_id")
@click.option("--weight", type=int)
@click.option("--state", type=click.Choice(["active", "draining"]))
@socket_option
@json_option
def services_update_backend(service_id, backend_id, weight, state, socket, as_json) -> int:
    """Change a backend's weight or state (draining keeps its flows)."""
    body = {k: v for k, v in (("weight", weight), ("state", state)) if v is not None}
    with Client(socket) as c:
        r = c.patch(f"/api/v1/services/{service_id}/backends/{backend_id}", json=body)
    return _show(r, as_json, lambda: _backend_rows([r]))


@services.command("delete-backend")
@click.argument("service_id")
@click.argument("backend_id")
@socket_option
@json_option
def services_delete_backend(service_id, backend_id, socket, as_json) -> int:
    """Delete a backend (its flows are re-balanced)."""
    with Client(socket) as c:
        r = c.delete(f"/api/v1/services/{service_id}/backends/{backend_id}")
    return _show(r, as_json, lambda: print(f"deleted backend {r['id']}: {r['address']}"))


# -- local: check-config, install-service --------------------------------------------------


@click.command("check-config")
@click.argument("file")
@click.option("--no-interfaces", is_flag=True,
              help="do not check that the interfaces exist on this box")
@click.option("--diff", is_flag=True,
              help="also show what making the running rules the file's [[rules]] and [[sets]] "
              "would change (asks the daemon; changes nothing)")
@socket_option
def check_config_cmd(file, no_interfaces, diff, socket) -> int:
    """Validate a config file (names the line of each mistake)."""
    from xdpfw.config import check_config
    from xdpfw.declared import declared_rules
    from xdpfw.rules.document import document_text
    from xdpfw.rules_cli import print_sync

    cfg = check_config(file, interfaces=not no_interfaces)
    declared = declared_rules(cfg, file)
    print(f"{file}: ok ({len(cfg.interfaces)} interfaces, {len(declared)} rules, "
          f"{len(cfg.sets)} sets)")
    if diff:
        with Client(socket) as c:
            r = c.put("/api/v1/rules", params={"dry_run": True},
                      content=document_text(declared), headers={"content-type": "text/plain"})
        print_sync(r, "the running rules, made the file's", as_json=False)
    return 0


def render_unit(xdpfw_bin: str, config: str, readme: Path = README) -> str:
    text = UNIT_TEMPLATE.read_text()
    return (text.replace(TEMPLATE_BIN, xdpfw_bin).replace(TEMPLATE_CONFIG, config)
            .replace(TEMPLATE_DOC, readme.resolve().as_uri()))


def xdpfw_executable() -> str:
    """The `xdpfw` of this installation (the venv's when run from it)."""
    here = Path(sys.executable).parent / "xdpfw"
    return str(here) if here.exists() else (shutil.which("xdpfw") or TEMPLATE_BIN)


@click.command("install-service")
@click.option("--config", default=TEMPLATE_CONFIG, show_default=True)
@click.option("--unit-dir", default="/etc/systemd/system", show_default=True)
@click.option("--xdpfw", "xdpfw_bin", help="path of the xdpfw executable (default: this one)")
@click.option("--no-enable", is_flag=True, help="only write the file")
def install_service(config, unit_dir, xdpfw_bin, no_enable) -> int:
    """Write (and enable) the systemd unit."""
    unit = Path(unit_dir) / "xdpfw.service"
    config = str(Path(config).resolve())
    if not Path(config).exists():
        print(f"note: {config} does not exist yet; the unit will not start without it",
              file=sys.stderr)
    unit.parent.mkdir(parents=True, exist_ok=True)
    unit.write_text(render_unit(xdpfw_bin or xdpfw_executable(), config))
    print(f"wrote {unit}")
    if no_enable:
        return 0
    if not Path("/run/systemd/system").is_dir():
        print("systemd is not running here: enable it later with "
              "`systemctl enable --now xdpfw`", file=sys.stderr)
        return 0
    for cmd in (["systemctl", "daemon-reload"], ["systemctl", "enable", "xdpfw.service"]):
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode != 0:
            raise XdpfwError(f"{' '.join(cmd)} failed: {p.stderr.strip()}")
    print("enabled: starts at boot; start it now with `systemctl start xdpfw`")
    return 0


COMMANDS = [attach, detach, status, health, watch, events, upgrade, stop, services,
            check_config_cmd, install_service]
