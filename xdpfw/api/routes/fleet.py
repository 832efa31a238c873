"""/api/v1/fleet: the nodes of this appliance's fleet, their revisions, health and lag."""

from __future__ import annotations

from fastapi import APIRouter

from xdpfw.api.deps import FleetDep
from xdpfw.api.error_body import responses
from xdpfw.errors import NotFoundError

router = APIRouter(prefix="/api/v1/fleet", tags=["fleet"])


@router.get("", responses=responses(404))
def fleet_status(fleet: FleetDep) -> dict:
    """Every node's status (applied revision, rules, health, last error) and its lag behind
    the fleet's last change. Served while etcd is away: then this node's own status and the
    reason."""
    if fleet is None:
        raise NotFoundError("this appliance is not in a fleet (no [fleet] in its config)")
    return fleet.view()
