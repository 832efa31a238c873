"""Dependencies shared by the routers."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Request

from xdpfw.service import Firewall


def get_firewall(request: Request) -> Firewall:
    return request.app.state.firewall


FirewallDep = Annotated[Firewall, Depends(get_firewall)]


def get_fleet(request: Request):
    """The node's xdpfw.fleet.service.Fleet, or None without [fleet]."""
    return getattr(request.app.state, "fleet", None)


FleetDep = Annotated[Any, Depends(get_fleet)]
