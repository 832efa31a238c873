"""Dependencies shared by the routers."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Request

from xdpfw.errors import ConflictError
from xdpfw.service import Firewall


def get_firewall(request: Request) -> Firewall:
    return request.app.state.firewall


FirewallDep = Annotated[Firewall, Depends(get_firewall)]


def get_fleet(request: Request):
    """The node's xdpfw.fleet.service.Fleet, or None without [fleet]."""
    return getattr(request.app.state, "fleet", None)


FleetDep = Annotated[Any, Depends(get_fleet)]


def refuse_on_fleet(fleet, why: str) -> None:
    """A change etcd cannot hold (replace every rule, bulk delete, rules from the config
    file): on a fleet node it would change this node alone, and the next sync would undo
    it. Refused (409) before anything is read or changed."""
    if fleet is not None:
        raise ConflictError(f"on a fleet node rules live in etcd; {why}")
