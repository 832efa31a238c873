"""The operator's commands of `xdpfw`: they talk to a running daemon over its unix socket
(xdpfw.client), plus the local ones that need no daemon (check-config, install-service).

Output is for people: tables and one-line errors (xdpfw.cli prints XdpfwError as
`xdpfw: <message>` and exits 1). `--json` gives the API's answer as is, for scripts.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from xdpfw.client import ApiError, ApiUnavailable, Client, default_socket
from xdpfw.errors import RuleValidationError, XdpfwError

UNIT_TEMPLATE = Path(__file__).resolve().parent.parent / "scripts" / "xdpfw.service"
TEMPLATE_BIN, TEMPLATE_CONFIG = "/usr/local/bin/xdpfw", "/etc/xdpfw/config.toml"
IMPORT_CHUNK = 50_000


def _client(args: argparse.Namespace) -> Client:
    return Client(args.socket)


def _print_json(data) -> None:
    print(json.dumps(data, indent=2, sort_keys=True))


def _table(rows: Iterable[Iterable], header: Iterable[str]) -> None:
    rows = [[("" if c is None else str(c)) for c in r] for r in rows]
    header = list(header)
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(header)]
    for r in [header, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def _si(n: float) -> str:
    for unit in ("", "k", "M", "G"):
        if abs(n) < 1000:
            return f"{n:.0f}{unit}" if unit == "" else f"{n:.1f}{unit}"
        n /= 1000
    return f"{n:.1f}T"


# -- rules ---------------------------------------------------------------------------------


def rules_add(args) -> int:
    body = {"prefix": args.prefix, "action": args.action, "comment": args.comment}
    if args.proto:
        body["proto"] = args.proto
    if args.dport:
        body["dport"] = args.dport
    with _client(args) as c:
        r = c.post("/api/v1/rules", json=body)
    if args.json:
        _print_json(r)
    else:
        print(f"rule {r['id']}: {_match(r)} {r['action']}")
    return 0


def _match(r: dict) -> str:
    parts = [r["prefix"]]
    if r.get("proto"):
        parts.append(r["proto"])
    if r.get("dport"):
        parts.append(f"port {r['dport']}")
    return " ".join(parts)


def rules_list(args) -> int:
    params = {"limit": args.limit, "offset": args.offset}
    for k in ("action", "proto", "prefix", "comment"):
        if getattr(args, k):
            params[k] = getattr(args, k)
    with _client(args) as c:
        page = c.get("/api/v1/rules", params=params)
    if args.json:
        _print_json(page)
        return 0
    _table(
        ([r["id"], r["prefix"], r["action"], r["proto"] or "any", r["dport"] or "any",
          r["packets"], r["bytes"], r["comment"]] for r in page["items"]),
        ["ID", "PREFIX", "ACTION", "PROTO", "DPORT", "PACKETS", "BYTES", "COMMENT"],
    )
    shown = len(page["items"])
    if page["total"] > shown:
        print(f"({shown} of {page['total']} rules; --limit/--offset for more)")
    return 0


def rules_delete(args) -> int:
    with _client(args) as c:
        for rid in args.ids:
            r = c.delete(f"/api/v1/rules/{rid}")
            print(f"deleted rule {r['id']}: {_match(r)} {r['action']} ({r['packets']} packets)")
    return 0


def rules_import(args) -> int:
    """Validate the whole file first (nothing is sent if a line is bad), then send it in
    chunks, each all-or-nothing, with progress on stderr."""
    from xdpfw.rules.blocklist import parse_prefixes

    src = sys.stdin if args.file == "-" else open(args.file)  # noqa: SIM115
    with src:
        entries = [(n, line) for n, line in enumerate(src, 1) if line.split("#", 1)[0].strip()]
    try:
        prefixes = parse_prefixes((line for _, line in entries), source="line")
    except RuleValidationError as e:
        # parse_prefixes numbers the non-empty lines it saw; name the file's line.
        msg = str(e)
        idx = int(msg.split()[1].rstrip(":")) - 1
        raise RuleValidationError(
            f"{args.file}:{entries[idx][0]}: {msg.split(': ', 1)[1]} (nothing was imported)"
        ) from None
    total = len(prefixes)
    if total == 0:
        raise RuleValidationError(f"{args.file} holds no prefix")
    progress = _Progress(total, "rules", enabled=not args.quiet)
    added = 0
    first_id = last_id = None
    with _client(args) as c:
        for start in range(0, total, args.chunk):
            chunk = [str(p) for p in prefixes[start : start + args.chunk]]
            body = {"prefixes": chunk, "action": args.action, "comment": args.comment}
            try:
                r = c.post("/api/v1/rules/bulk", json=body)
            except ApiError as e:
                progress.done()
                line_from = entries[start][0]
                line_to = entries[min(start + args.chunk, total) - 1][0]
                kept = f"; lines before {line_from} were imported (rules {first_id}-{last_id})" \
                    if added else "; nothing was imported"
                raise ApiError(
                    e.status, f"{args.file} lines {line_from}-{line_to}: {e}{kept}"
                ) from None
            first_id = first_id if first_id is not None else r["first_id"]
            last_id = r["last_id"]
            added += r["added"]
            progress.update(added)
    progress.done()
    print(f"imported {added} rules from {args.file} (ids {first_id}-{last_id})")
    return 0


class _Progress:
    """`\\r`-updated line on a terminal; a line per step otherwise (logs, CI)."""

    def __init__(self, total: int, what: str, enabled: bool = True) -> None:
        self.total, self.what, self.enabled = total, what, enabled
        self.start = time.monotonic()
        self.tty = sys.stderr.isatty()

    def update(self, n: int) -> None:
        if not self.enabled:
            return
        rate = n / max(time.monotonic() - self.start, 1e-6)
        line = f"{n}/{self.total} {self.what} ({100 * n // self.total}%), {_si(rate)}/s"
        print(f"\r{line}" if self.tty else line, end="" if self.tty else "\n",
              file=sys.stderr, flush=True)

    def done(self) -> None:
        if self.enabled and self.tty:
            print(file=sys.stderr)


# -- interfaces, status --------------------------------------------------------------------


def attach(args) -> int:
    body = {"name": args.ifname, "netns": args.netns, "mode": args.mode, "policy": args.policy,
            "unparsed_policy": args.unparsed_policy, "guard_l2": args.guard_l2,
            "chain_existing": not args.no_chain, "chain_prog_id": args.chain_prog_id}
    with _client(args) as c:
        r = c.post("/api/v1/interfaces", json=body)
    ns = f" (netns {r['netns']})" if r["netns"] else ""
    chained = f", then program {r['chained_prog_id']}" if r.get("chained_prog_id") else ""
    print(f"guarding {r['name']}{ns} in {r['mode_in_use']} mode, policy {r['policy']}{chained}")
    return 0


def detach(args) -> int:
    params = {"netns": args.netns} if args.netns else None
    with _client(args) as c:
        r = c.delete(f"/api/v1/interfaces/{args.ifname}", params=params)
    print(f"detached {r['name']}" + (f" (netns {r['netns']})" if r["netns"] else ""))
    return 0


def status(args) -> int:
    with _client(args) as c:
        prog = c.get("/api/v1/program")
        health = c.get("/healthz")
        first = c.get("/api/v1/stats")
        t0 = time.monotonic()
        second = first
        if args.interval > 0:
            time.sleep(args.interval)
            second = c.get("/api/v1/stats")
        dt = max(time.monotonic() - t0, 1e-6)
    if args.json:
        _print_json({"program": prog, "health": health, "stats": second})
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
                     _si((i["passed"]["packets"] - b["passed"]["packets"]) / dt),
                     _si((i["dropped"]["packets"] - b["dropped"]["packets"]) / dt)])
    _table(rows, ["INTERFACE", "NETNS", "MODE", "STATE", "PASSED", "DROPPED", "PASS/S",
                  "DROP/S"])
    print()
    rows = []
    for name, v in second["actions"].items():
        prev = first["actions"].get(name, v)
        rows.append([name, v["packets"], v["bytes"],
                     _si((v["packets"] - prev["packets"]) / dt)])
    _table(rows, ["REASON", "PACKETS", "BYTES", "PKT/S"])
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


def watch(args) -> int:
    deadline = time.monotonic() + args.seconds if args.seconds else None
    n = 0
    with Client(args.socket, timeout=args.seconds or 60.0) as c:
        try:
            for event in c.events():
                if event.get("type") == "lagged":
                    print(f"(missed {event['missed']} events: this client was too slow)",
                          file=sys.stderr, flush=True)
                    continue
                print(json.dumps(event) if args.json else format_event(event), flush=True)
                n += 1
                if args.count and n >= args.count:
                    break
                if deadline and time.monotonic() > deadline:
                    break
        except ApiUnavailable:
            if n == 0 or not args.seconds:
                raise
        except KeyboardInterrupt:
            pass
    return 0


# -- program, lifecycle --------------------------------------------------------------------


def upgrade(args) -> int:
    body = {}
    if args.source:  # read here, with the caller's permissions: the daemon reads no path
        source = Path(args.source)
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", source.stem)[:60].lstrip(".-") or "upload"
        body = {"source_text": source.read_text(), "source_name": f"{name}.c"}
    with Client(args.socket, timeout=300.0) as c:
        try:
            r = c.post("/api/v1/program/reload", json=body)
        except ApiError as e:
            # The verifier log follows the one-line reason: it is what the operator needs.
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


def stop(args) -> int:
    """Ask the daemon to exit (and, with --detach, to unguard everything and remove pins);
    wait until it has. If the API does not answer, fall back to SIGTERM via the pid file."""
    pid = _read_pid(args.state_dir)
    try:
        with _client(args) as c:
            c.post("/api/v1/shutdown", json={"detach": args.detach})
    except ApiUnavailable:
        if args.detach or pid is None:
            raise
        os.kill(pid, signal.SIGTERM)
    gone = _wait(lambda: not os.path.exists(args.socket or default_socket())
                 and (pid is None or not _alive(pid)), args.timeout)
    if not gone:
        raise XdpfwError(f"the daemon did not exit within {args.timeout}s")
    print("stopped; " + ("interfaces detached and pins removed" if args.detach
                         else "the data plane keeps guarding"))
    return 0


def _read_pid(state_dir: str) -> int | None:
    try:
        return int((Path(state_dir) / "xdpfw.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


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


# -- services (load balancer: a thin pass-through to /api/v1/services) ----------------------


def _json_arg(text: str) -> dict:
    try:
        return json.loads(text)
    except ValueError as e:
        raise XdpfwError(f"the body is not JSON ({e}): {text!r}") from None


def services(args) -> int:
    path = "/api/v1/services"
    with _client(args) as c:
        if args.op == "list":
            r = c.get(path)
        elif args.op == "get":
            r = c.get(f"{path}/{args.id}")
        elif args.op == "add":
            r = c.post(path, json=_json_arg(args.body))
        elif args.op == "delete":
            r = c.delete(f"{path}/{args.id}")
        elif args.op == "backends":
            r = c.get(f"{path}/{args.id}/backends")
        elif args.op == "add-backend":
            r = c.post(f"{path}/{args.id}/backends", json=_json_arg(args.body))
        elif args.op == "update-backend":
            body = {k: v for k, v in (("weight", args.weight), ("state", args.state))
                    if v is not None}
            r = c.patch(f"{path}/{args.id}/backends/{args.backend}", json=body)
        else:  # delete-backend
            r = c.delete(f"{path}/{args.id}/backends/{args.backend}")
    _print_json(r)
    return 0


# -- local: check-config, install-service --------------------------------------------------


def check_config_cmd(args) -> int:
    from xdpfw.config import check_config

    cfg = check_config(args.file, interfaces=not args.no_interfaces)
    print(f"{args.file}: ok ({len(cfg.interfaces)} interfaces, {len(cfg.rules)} rules)")
    return 0


def render_unit(xdpfw_bin: str, config: str) -> str:
    text = UNIT_TEMPLATE.read_text()
    return text.replace(TEMPLATE_BIN, xdpfw_bin).replace(TEMPLATE_CONFIG, config)


def xdpfw_executable() -> str:
    """The `xdpfw` of this installation (the venv's when run from it)."""
    here = Path(sys.executable).parent / "xdpfw"
    return str(here) if here.exists() else (shutil.which("xdpfw") or TEMPLATE_BIN)


def install_service(args) -> int:
    unit = Path(args.unit_dir) / "xdpfw.service"
    config = str(Path(args.config).resolve())
    if not Path(config).exists():
        print(f"note: {config} does not exist yet; the unit will not start without it",
              file=sys.stderr)
    unit.parent.mkdir(parents=True, exist_ok=True)
    unit.write_text(render_unit(args.xdpfw or xdpfw_executable(), config))
    print(f"wrote {unit}")
    if args.no_enable:
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


# -- parser --------------------------------------------------------------------------------


def add_commands(sub: argparse._SubParsersAction) -> None:
    api = argparse.ArgumentParser(add_help=False)
    api.add_argument("--socket", default=None,
                     help=f"API unix socket (default $XDPFW_SOCKET or {default_socket()})")
    js = argparse.ArgumentParser(add_help=False)
    js.add_argument("--json", action="store_true", help="print the API's JSON answer")

    rules = sub.add_parser("rules", help="add, list, delete or import rules")
    rsub = rules.add_subparsers(dest="op", required=True)
    p = rsub.add_parser("add", parents=[api, js], help="add one rule")
    p.add_argument("prefix", help="source prefix or address, e.g. 203.0.113.0/24")
    p.add_argument("--action", default="drop", help="drop (default) or pass")
    p.add_argument("--proto", choices=["tcp", "udp", "icmp"])
    p.add_argument("--dport", type=int, help="destination port (needs --proto tcp/udp)")
    p.add_argument("--comment", default="")
    p.set_defaults(func=rules_add)
    p = rsub.add_parser("list", parents=[api, js], help="list rules with their counters")
    p.add_argument("--action")
    p.add_argument("--proto")
    p.add_argument("--prefix")
    p.add_argument("--comment")
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--offset", type=int, default=0)
    p.set_defaults(func=rules_list)
    p = rsub.add_parser("delete", parents=[api], help="delete rules by id")
    p.add_argument("ids", nargs="+", type=int)
    p.set_defaults(func=rules_delete)
    p = rsub.add_parser("import", parents=[api], help="import a blocklist file (- for stdin)")
    p.add_argument("file")
    p.add_argument("--action", default="drop")
    p.add_argument("--comment", default="")
    p.add_argument("--chunk", type=int, default=IMPORT_CHUNK, help="rules per request")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=rules_import)

    p = sub.add_parser("attach", parents=[api], help="guard an interface")
    p.add_argument("ifname")
    p.add_argument("--netns")
    p.add_argument("--mode", default="auto", choices=["auto", "native", "generic", "offload"])
    p.add_argument("--policy", default="pass", choices=["pass", "drop"])
    p.add_argument("--unparsed-policy", default="pass", choices=["pass", "drop"])
    p.add_argument("--guard-l2", action="store_true")
    p.add_argument("--chain-prog-id", type=int,
                   help="run this loaded XDP program (bpftool prog id) after xdpfw's passes")
    p.add_argument("--no-chain", action="store_true",
                   help="refuse to attach over another XDP program instead of chaining it")
    p.set_defaults(func=attach)
    p = sub.add_parser("detach", parents=[api], help="stop guarding an interface")
    p.add_argument("ifname")
    p.add_argument("--netns")
    p.set_defaults(func=detach)

    p = sub.add_parser("status", parents=[api, js],
                       help="program, interfaces, modes, counters and rates")
    p.add_argument("--interval", type=float, default=1.0,
                   help="seconds between the two samples rates come from (0: no rates)")
    p.set_defaults(func=status)

    p = sub.add_parser("watch", parents=[api, js], help="print sampled drop events live")
    p.add_argument("--count", type=int, default=0, help="exit after this many events")
    p.add_argument("--seconds", type=float, default=0, help="exit after this long")
    p.set_defaults(func=watch)

    from xdpfw.capture_cli import add_capture_command

    add_capture_command(sub, api)

    p = sub.add_parser("upgrade", parents=[api],
                       help="build the program again and swap it in atomically")
    p.add_argument("--source", help="C source to build instead of the installed xdpfw.c")
    p.set_defaults(func=upgrade)

    p = sub.add_parser("stop", parents=[api], help="stop the daemon (the data plane stays)")
    p.add_argument("--detach", action="store_true",
                   help="also detach every interface and remove the pinned maps")
    p.add_argument("--state-dir", default="/var/lib/xdpfw", help="where the pid file is")
    p.add_argument("--timeout", type=float, default=30.0)
    p.set_defaults(func=stop)

    svc = sub.add_parser("services", help="load-balancer services (JSON in, JSON out)")
    ssub = svc.add_subparsers(dest="op", required=True)
    ssub.add_parser("list", parents=[api]).set_defaults(func=services)
    for op in ("get", "delete", "backends"):
        p = ssub.add_parser(op, parents=[api])
        p.add_argument("id")
        p.set_defaults(func=services)
    p = ssub.add_parser("add", parents=[api])
    p.add_argument("body", help="the service as JSON")
    p.set_defaults(func=services)
    p = ssub.add_parser("add-backend", parents=[api])
    p.add_argument("id")
    p.add_argument("body", help="the backend as JSON")
    p.set_defaults(func=services)
    p = ssub.add_parser("update-backend", parents=[api],
                        help="change a backend's weight or state (draining keeps its flows)")
    p.add_argument("id")
    p.add_argument("backend")
    p.add_argument("--weight", type=int)
    p.add_argument("--state", choices=["active", "draining"])
    p.set_defaults(func=services)
    p = ssub.add_parser("delete-backend", parents=[api])
    p.add_argument("id")
    p.add_argument("backend")
    p.set_defaults(func=services)

    p = sub.add_parser("check-config", help="validate a config file (names the line)")
    p.add_argument("file")
    p.add_argument("--no-interfaces", action="store_true",
                   help="do not check that the interfaces exist on this box")
    p.set_defaults(func=check_config_cmd)

    p = sub.add_parser("install-service", help="write (and enable) the systemd unit")
    p.add_argument("--config", default=TEMPLATE_CONFIG)
    p.add_argument("--unit-dir", default="/etc/systemd/system")
    p.add_argument("--xdpfw", help="path of the xdpfw executable (default: this one)")
    p.add_argument("--no-enable", action="store_true", help="only write the file")
    p.set_defaults(func=install_service)
