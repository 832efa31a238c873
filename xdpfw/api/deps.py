"""Dependencies shared by the routers."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from xdpfw.service import Firewall


def get_firewall(request: Request) -> Firewall:
    return request.app.state.firewall


FirewallDep = Annotated[Firewall, Depends(get_firewall)]
