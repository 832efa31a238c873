"""`xdpfw fleet status`: the nodes of this appliance's fleet, as GET /api/v1/fleet says."""

from __future__ import annotations

import time

import click

from xdpfw.cli_options import json_option, socket_option
from xdpfw.cli_output import print_json, table
from xdpfw.client import Client


@click.group()
def fleet() -> None:
    """The fleet this appliance shares its rules with through etcd ([fleet])."""


@fleet.command("status")
@socket_option
@json_option
def fleet_status(socket, as_json) -> int:
    """Every node: applied revision, lag behind the fleet's last change, rules, services,
    health, last error. While etcd is away: this node alone, and why. Exit status 1 unless every
    node is healthy and caught up."""
    with Client(socket) as c:
        view = c.get("/api/v1/fleet")
    if as_json:
        print_json(view)
    else:
        etcd = view["etcd"]
        print(f"node {view['node']}, prefix {view['prefix']}: etcd "
              + ("reachable" if etcd["reachable"] else f"UNREACHABLE ({etcd['error']})")
              + (f", fleet revision {view['revision']}" if view["revision"] else ""))
        now = time.time()
        table([[n.get("node"), n.get("applied_revision"), n.get("lag"), n.get("rules"),
                "-" if n.get("services") is None else n["services"], n.get("health"),
                _age(now, n.get("updated")), n.get("last_error") or ""]
               for n in view["nodes"]],
              ["NODE", "APPLIED", "LAG", "RULES", "SERVICES", "HEALTH", "SEEN", "LAST ERROR"],
              right=["APPLIED", "LAG", "RULES", "SERVICES", "SEEN"])
    healthy = view["etcd"]["reachable"] and all(
        n.get("health") == "ok" and n.get("lag") == 0 for n in view["nodes"])
    return 0 if healthy else 1


def _age(now: float, updated) -> str:
    return f"{max(0.0, now - updated):.0f}s ago" if isinstance(updated, int | float) else ""
