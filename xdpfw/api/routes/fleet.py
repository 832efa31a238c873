"""/api/v1/fleet: the nodes of this appliance's fleet, their revisions, health and lag; and
the fleet's sets (xdpfw/fleet/chunks.py)."""

from __future__ import annotations

import json

from fastapi import APIRouter, HTTPException, Request, status
from fastapi.concurrency import run_in_threadpool

from xdpfw.api.bodies import read_body
from xdpfw.api.deps import FleetDep
from xdpfw.api.error_body import responses
from xdpfw.api.schemas import FleetSetDeleted, FleetSetWritten
from xdpfw.errors import NotFoundError, RuleValidationError
from xdpfw.rules.blocklist import parse_blocklist_bytes, parse_prefixes
from xdpfw.rules.model import Action
from xdpfw.rules.table import Prefixes

router = APIRouter(prefix="/api/v1/fleet", tags=["fleet"])


def _fleet(fleet):
    if fleet is None:
        raise NotFoundError("this appliance is not in a fleet (no [fleet] in its config)")
    return fleet


@router.get("", responses=responses(404))
def fleet_status(fleet: FleetDep) -> dict:
    """Every node's status (applied revision, rules, health, last error) and its lag behind
    the fleet's last change. Served while etcd is away: then this node's own status and the
    reason."""
    return _fleet(fleet).view()


@router.get("/sets", responses=responses(404))
def list_sets(fleet: FleetDep) -> list[dict]:
    """The fleet's sets: name, prefixes, chunks, action, comment, revision."""
    return _fleet(fleet).list_sets()


@router.put("/sets/{name}", response_model=FleetSetWritten,
            responses=responses(404, 409, 413, 415, 422, 502, 503))
async def replace_set(request: Request, name: str, fleet: FleetDep,
                      action: Action = Action.DROP, comment: str = "") -> dict:
    """Make fleet set `name` exactly the body: a `text/plain` blocklist, or JSON
    `{"prefixes": [...]}`. Chunks go to etcd, then the manifest in one transaction; the
    answer comes once etcd holds it, and says whether this node applied it within 30 s."""
    f = _fleet(fleet)
    body = await read_body(request)
    ctype = request.headers.get("content-type", "").split(";")[0].strip()
    if ctype == "text/plain":
        prefixes = await run_in_threadpool(parse_blocklist_bytes, body)
    elif ctype in ("application/json", ""):
        prefixes = await run_in_threadpool(_json_prefixes, body)
    else:
        raise HTTPException(status.HTTP_415_UNSUPPORTED_MEDIA_TYPE,
                            f"send text/plain (a blocklist) or application/json, not {ctype}")
    del body
    return await run_in_threadpool(f.replace_set, name, prefixes, action, comment)


@router.delete("/sets/{name}", response_model=FleetSetDeleted,
               responses=responses(404, 502, 503))
def delete_set(name: str, fleet: FleetDep) -> dict:
    return _fleet(fleet).delete_set(name)


def _json_prefixes(body: bytes | bytearray) -> Prefixes:
    try:
        data = json.loads(body)
    except ValueError:
        raise RuleValidationError("the body is not JSON") from None
    if not isinstance(data, dict) or set(data) != {"prefixes"} \
            or not isinstance(data["prefixes"], list):
        raise RuleValidationError('send {"prefixes": ["192.0.2.0/24", ...]}')
    if not all(isinstance(p, str) for p in data["prefixes"]):
        raise RuleValidationError("prefixes: each must be a string")
    return Prefixes.of(parse_prefixes(data["prefixes"], source="prefixes item"))
