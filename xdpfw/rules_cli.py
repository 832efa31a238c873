"""The rule commands of `xdpfw`: rules (add, list, delete, import, export), sets, explain,
audit and reload. Each change is one request, so one transaction on the daemon's side: an
import or a set replace either happens whole or not at all.

A file is checked here first (xdpfw/rules/document.py, the parser the daemon uses), so a bad
line is named with its file and nothing is sent; then it goes as one text/plain body, with
progress on stderr as it is sent.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator

import click

from xdpfw.cli_options import json_option, socket_option
from xdpfw.cli_output import ImportProgress, print_json, table
from xdpfw.client import ApiError, Client
from xdpfw.errors import RuleValidationError
from xdpfw.rules import document
from xdpfw.rules.kind import RuleKind

PIECE = 1 << 20  # the body goes in pieces of this many bytes, one progress step each
FIRST_BYTE = re.compile(rb"\S")
SHOWN = 5  # examples of added/removed/changed rules printed (--json has all the API gives)
RULE_COLUMNS = ["ID", "PREFIX", "ACTION", "PROTO", "DPORT", "PACKETS", "BYTES", "SET", "COMMENT"]


def _match(r: dict) -> str:
    parts = [r["prefix"]]
    if r.get("proto"):
        parts.append(r["proto"])
    if r.get("dport"):
        parts.append(f"port {r['dport']}")
    return " ".join(parts)


def _given(**params) -> dict:
    """Query parameters: those the person gave (None: left out)."""
    return {k: v for k, v in params.items() if v is not None}


def _rule_rows(rules: list[dict]) -> None:
    table(([r["id"], r["prefix"], r["action"], r["proto"] or "any", r["dport"] or "any",
            r["packets"], r["bytes"], r.get("set") or "-", r["comment"]] for r in rules),
          RULE_COLUMNS, right=["ID", "PACKETS", "BYTES"])


# -- files: read, checked, sent -------------------------------------------------------------


def _is_json(data: bytes) -> bool:
    """A JSON document (an export, or a bulk body) rather than text: the first byte that is
    not white space opens an object (found without copying a 30 MB file)."""
    m = FIRST_BYTE.search(data)
    return m is not None and m.group() == b"{"


def read_rules_file(file: str, kind: RuleKind) -> tuple[bytes, int]:
    """FILE's bytes (- is stdin) and how many rules they hold, checked with the daemon's own
    parser: a bad line is an error naming the file and line, and nothing is sent."""
    if file == "-":
        data = sys.stdin.buffer.read()
    else:
        with open(file, "rb") as f:
            data = f.read()
    if _is_json(data):
        doc = document.parse_json(data)
    else:
        try:
            doc = document.parse_text(data, kind)
        except RuleValidationError as e:  # "line N: ..." -> "FILE:N: ..."
            msg = str(e)
            if msg.startswith("line "):
                line, rest = msg[5:].split(": ", 1)
                msg = f"{file}:{line}: {rest}"
            raise RuleValidationError(f"{msg} (nothing was sent)") from None
    return data, len(doc)


def send_file(c: Client, method: str, path: str, data: bytes, params: dict,
              quiet: bool) -> dict:
    """One request whose body is `data` (JSON if it looks like it, else text), sent in
    pieces with progress (bytes sent) on stderr."""
    progress = ImportProgress(len(data), "bytes sent", enabled=not quiet and len(data) > PIECE)

    def pieces() -> Iterator[bytes]:
        for start in range(0, len(data), PIECE):
            yield data[start:start + PIECE]
            progress.update(min(start + PIECE, len(data)))

    ctype = "application/json" if _is_json(data) else "text/plain"
    try:
        return c.request(method, path, params=params, content=pieces(),
                         headers={"content-type": ctype, "content-length": str(len(data))})
    finally:
        progress.done()


def _sync_line(r: dict) -> str:
    verb = "would be " if r["dry_run"] else ""
    ids = f" (ids {r['first_id']}-{r['last_id']})" if r["first_id"] is not None else ""
    return (f"{r['added']} {verb}added, {r['removed']} {verb}removed, {r['changed']} "
            f"{verb}changed, {r['kept']} kept{ids}")


def _fleet_line(r: dict) -> str:
    count = f"{r['count']} rules, " if "count" in r else ""
    here = "applied here" if r.get("applied_here") else "not yet applied here"
    return f"written to the fleet at etcd revision {r['revision']} ({count}{here})"


def print_sync(r: dict, what: str, as_json: bool) -> None:
    if as_json:
        print_json(r)
        return
    if "revision" in r:  # a fleet node wrote it to etcd (README "Fleet")
        print(f"{what}: {_fleet_line(r)}")
        return
    print(f"{what}: {_sync_line(r)}" + (" (dry run: nothing changed)" if r["dry_run"] else ""))
    for name, items in r["examples"].items():
        if items:
            more = ", ..." if len(items) > SHOWN else ""
            print(f"  {name}: " + ", ".join(items[:SHOWN]) + more)


# -- rules ---------------------------------------------------------------------------------


@click.group()
def rules() -> None:
    """Add, list, delete, import or export rules."""


@rules.command("add")
@click.argument("prefix")
@click.option("--action", default="drop", show_default=True, help="drop or pass")
@click.option("--proto", type=click.Choice(["tcp", "udp", "icmp"]))
@click.option("--dport", type=int, help="destination port 1-65535 (needs --proto tcp/udp)")
@click.option("--comment", default="")
@socket_option
@json_option
def rules_add(prefix, action, proto, dport, comment, socket, as_json) -> int:
    """Add one rule for a source PREFIX (or address), e.g. 203.0.113.0/24."""
    body = {"prefix": prefix, "action": action, "comment": comment}
    if proto is not None:
        body["proto"] = proto
    if dport is not None:  # 0 too: the API refuses it, rather than this making an any-port rule
        body["dport"] = dport
    with Client(socket) as c:
        r = c.post("/api/v1/rules", json=body)
    if as_json:
        print_json(r)
    else:
        print(f"rule {r['id']}: {_match(r)} {r['action']}")
    return 0


@rules.command("list")
@click.option("--action")
@click.option("--proto")
@click.option("--prefix", help="this exact prefix")
@click.option("--covering", metavar="ADDR",
              help="the rules whose prefix contains ADDR, in the order they decide")
@click.option("--set", "rule_set", help="the rules of this set")
@click.option("--comment", help="a substring of the comment")
@click.option("--limit", type=int, default=100, show_default=True)
@click.option("--offset", type=int, default=0, show_default=True)
@socket_option
@json_option
def rules_list(action, proto, prefix, covering, rule_set, comment, limit, offset, socket,
               as_json) -> int:
    """List rules with their counters (`rules export` writes them all)."""
    params = _given(limit=limit, offset=offset, action=action, proto=proto, prefix=prefix,
                    covering=covering, set=rule_set, comment=comment)
    with Client(socket) as c:
        page = c.get("/api/v1/rules", params=params)
    if as_json:
        print_json(page)
        return 0
    _rule_rows(page["items"])
    shown = len(page["items"])
    if page["total"] > shown:
        print(f"({shown} of {page['total']} rules; --limit/--offset for more, or "
              "`xdpfw rules export`)")
    return 0


@rules.command("delete")
@click.argument("ids", nargs=-1, type=int)
@click.option("--set", "rule_set", help="every rule of this set")
@click.option("--comment", help="every rule whose comment is exactly this")
@socket_option
def rules_delete(ids, rule_set, comment, socket) -> int:
    """Delete rules by id, or every rule of a --set or with a --comment, in one request.

    If some of the ids do not exist, the others are still deleted one by one (as rm does):
    each deleted rule is printed, each failure named, and the exit status is 1."""
    given = [k for k, v in (("ids", ids or None), ("--set", rule_set), ("--comment", comment))
             if v is not None]  # --comment "" is the rules with no comment
    if len(given) != 1:
        raise click.UsageError("give rule ids, or --set NAME, or --comment TEXT (one of them)")
    with Client(socket) as c:
        if rule_set is not None or comment is not None:
            body = {"set": rule_set} if rule_set is not None else {"comment": comment}
            r = c.post("/api/v1/rules/delete", json=body)
            print(f"deleted {r['removed']} rules")
            return 0
        if len(ids) == 1:
            return _delete_each(c, ids)
        try:
            r = c.post("/api/v1/rules/delete", json={"ids": list(ids)})
        except ApiError as e:
            if e.status != 404:
                raise
            return _delete_each(c, ids)  # name what is missing, delete the rest
        print(f"deleted {r['removed']} rules")
        return 0


def _delete_each(c: Client, ids) -> int:
    failed: list[int] = []
    for rid in ids:
        try:
            r = c.delete(f"/api/v1/rules/{rid}")
        except ApiError as e:  # an unreachable daemon (ApiUnavailable) stops it all
            failed.append(rid)
            print(f"xdpfw: {e}", file=sys.stderr)
            continue
        print(f"deleted rule {r['id']}: {_match(r)} {r['action']} ({r['packets']} packets)",
              flush=True)
    if failed and len(ids) > 1:
        print(f"xdpfw: {len(ids) - len(failed)} of {len(ids)} rules deleted; not deleted: "
              + ", ".join(map(str, failed)), file=sys.stderr)
    return 1 if failed else 0


@rules.command("import")
@click.argument("file")
@click.option("--action", default="drop", show_default=True,
              help="for a plain blocklist's lines (an export's sections say their own)")
@click.option("--comment", default="")
@click.option("--set", "rule_set", default="", help="the set a plain blocklist's lines join")
@click.option("--replace", is_flag=True,
              help="make the rules exactly the file's (an export): others are deleted")
@click.option("--skip-existing", is_flag=True,
              help="leave out rules whose match exists already, instead of refusing")
@click.option("--dry-run", is_flag=True, help="with --replace: say what would change")
@click.option("--quiet", is_flag=True, help="no progress output")
@socket_option
@json_option
def rules_import(file, action, comment, rule_set, replace, skip_existing, dry_run, quiet,
                 socket, as_json) -> int:
    """Import FILE (- for stdin): a blocklist (one prefix per line, # comments), or what
    `rules export` wrote (text or JSON). All or nothing: one request, one transaction."""
    if replace and skip_existing:
        raise click.UsageError("--replace and --skip-existing do not go together")
    if dry_run and not replace:
        raise click.UsageError("--dry-run goes with --replace")
    kind = RuleKind(action=action, comment=comment, set=rule_set)
    data, count = read_rules_file(file, kind)
    if count == 0 and not replace:
        raise RuleValidationError(f"{file} holds no rule")
    params = {"action": action, "comment": comment}
    with Client(socket) as c:
        if replace:
            r = send_file(c, "PUT", "/api/v1/rules", data, params | {"dry_run": dry_run},
                          quiet)
            print_sync(r, f"rules from {file}", as_json)
            return 0
        params |= {"set": rule_set, "skip_existing": skip_existing}
        r = send_file(c, "POST", "/api/v1/rules/bulk", data, params, quiet)
    if as_json:
        print_json(r)
        return 0
    ids = f" (ids {r['first_id']}-{r['last_id']})" if r["first_id"] is not None else ""
    skipped = f", {r['skipped']} existing skipped" if skip_existing else ""
    print(f"imported {r['added']} rules from {file}{ids}{skipped}")
    return 0


@rules.command("export")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text",
              show_default=True)
@socket_option
def rules_export(fmt, socket) -> int:
    """Write every rule (sets, comments, ports) to stdout, as `rules import` (and
    `rules import --replace`) read it back."""
    out = sys.stdout.buffer
    with Client(socket) as c:
        for chunk in c.stream("/api/v1/rules/export", params={"format": fmt}):
            out.write(chunk)
    out.flush()
    return 0


# -- sets ----------------------------------------------------------------------------------


@click.group()
def sets() -> None:
    """Named sets of rules (a feed, a partner list), each replaced as a whole."""


@sets.command("list")
@socket_option
@json_option
def sets_list(socket, as_json) -> int:
    """Every set that has rules, and how many."""
    with Client(socket) as c:
        r = c.get("/api/v1/sets")
    if as_json:
        print_json(r)
    else:
        table(([s["name"], s["rules"]] for s in r), ["SET", "RULES"], right=["RULES"])
    return 0


@sets.command("replace")
@click.argument("name")
@click.argument("file")
@click.option("--action", default="drop", show_default=True)
@click.option("--comment", default="")
@click.option("--dry-run", is_flag=True, help="say what would change, change nothing")
@click.option("--quiet", is_flag=True, help="no progress output")
@socket_option
@json_option
def sets_replace(name, file, action, comment, dry_run, quiet, socket, as_json) -> int:
    """Make set NAME exactly FILE's rules (- for stdin), atomically: an address in the old
    set and the new one is never unguarded."""
    data, count = read_rules_file(file, RuleKind(action=action, comment=comment, set=name))
    if count == 0:
        raise RuleValidationError(f"{file} holds no rule: `xdpfw sets delete {name}` empties "
                                  "a set")
    with Client(socket) as c:
        r = send_file(c, "PUT", f"/api/v1/sets/{name}", data,
                      {"action": action, "comment": comment, "dry_run": dry_run}, quiet)
    print_sync(r, f"set {name}", as_json)
    return 0


@sets.command("delete")
@click.argument("name")
@socket_option
def sets_delete(name, socket) -> int:
    """Delete every rule of set NAME, in one change."""
    with Client(socket) as c:
        r = c.delete(f"/api/v1/sets/{name}")
    print(f"deleted set {name}: " + (f"{r['removed']} rules" if "removed" in r
                                     else _fleet_line(r)))
    return 0


# -- explain, audit, reload ----------------------------------------------------------------


def _probe(what: str | None) -> dict:
    """`tcp/22`, `udp/53`, `icmp`, `tcp` -> query parameters."""
    if what is None:
        return {}
    proto, _, port = what.partition("/")
    if proto not in ("tcp", "udp", "icmp"):
        raise click.BadParameter(f"{what!r}: tcp/PORT, udp/PORT, tcp, udp or icmp",
                                 param_hint="PROTO[/PORT]")
    if not port:
        return {"proto": proto}
    if not port.isdigit():
        raise click.BadParameter(f"{what!r}: the port is a number", param_hint="PROTO[/PORT]")
    return {"proto": proto, "dport": int(port)}


@click.command()
@click.argument("address")
@click.argument("what", metavar="[PROTO[/PORT]]", required=False)
@click.option("--dst", help="the destination address")
@click.option("--interface", help="decide as this attached interface's instance (its policy)")
@click.option("--netns", help="the interface's network namespace")
@socket_option
@json_option
def explain(address, what, dst, interface, netns, socket, as_json) -> int:
    """Which rule decides for ADDRESS, e.g. `xdpfw explain 38.158.13.5 tcp/22`: the loaded
    program runs on a crafted packet, and every rule covering the address is listed."""
    params = _given(src=address, dst=dst, interface=interface, netns=netns) | _probe(what)
    with Client(socket) as c:
        r = c.get("/api/v1/explain", params=params)
    if as_json:
        print_json(r)
        return 0
    by = (f"rule {r['rule']['id']}: {_match(r['rule'])} {r['rule']['action']}"
          + (f" [set {r['rule']['set']}]" if r["rule"]["set"] else "")
          if r["rule"] else f"the {r['policy']} policy")
    print(f"{r['packet']}: {r['verdict']} ({r['reason']}), decided by {by}")
    if r["covering"]:
        print("rules covering the address, in the order they decide:")
        _rule_rows(r["covering"])
    else:
        print("no rule covers the address")
    return 0


@click.command()
@click.option("--since", default="0", show_default=True,
              help="Unix time or ISO 8601 (UTC unless it says otherwise)")
@click.option("--limit", type=int, default=1000, show_default=True)
@socket_option
@json_option
def audit(since, limit, socket, as_json) -> int:
    """The audit trail: every change, when, and from which client."""
    import datetime as dt

    with Client(socket) as c:
        r = c.get("/api/v1/audit", params={"since": since, "limit": limit})
    if as_json:
        print_json(r)
        return 0
    table(([a["id"], dt.datetime.fromtimestamp(a["time"], dt.UTC).isoformat(timespec="seconds"),
            a["client"], a["action"], a["detail"]] for a in r),
          ["ID", "TIME (UTC)", "CLIENT", "ACTION", "DETAIL"], right=["ID"])
    return 0


@click.command()
@click.option("--dry-run", is_flag=True, help="say what would change, change nothing")
@socket_option
@json_option
def reload(dry_run, socket, as_json) -> int:
    """Make the rules equal to the config file's [[rules]] and [[sets]] again
    ([state] rules_from_config)."""
    with Client(socket) as c:
        r = c.post("/api/v1/config/reload", params={"dry_run": dry_run})
    print_sync(r, "rules from the config file", as_json)
    return 0


RULE_COMMANDS = [rules, sets, explain, audit, reload]
