"""/api/v1/sets: named sets of rules (a blocklist feed, a partner list), each replaced as a
whole, atomically: PUT makes the set exactly the body (service.Firewall.replace_set).

On a fleet node ([fleet]) PUT and DELETE write the fleet set of that name, as
/api/v1/fleet/sets/{name} does (and answer as it does), when the body is one a fleet set
holds (prefixes under one action and comment, any protocol); otherwise 409. GET lists the
sets this node enforces.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from xdpfw.api.audit import audit
from xdpfw.api.bodies import RULES_BODY, read_rules
from xdpfw.api.deps import FirewallDep, FleetDep
from xdpfw.api.error_body import responses
from xdpfw.api.schemas import FleetSetDeleted, FleetSetWritten, SetPublic, SyncResult
from xdpfw.errors import NotFoundError, RuleValidationError
from xdpfw.rules.kind import RuleKind
from xdpfw.rules.model import Action, check_set_name

router = APIRouter(prefix="/api/v1/sets", tags=["sets"])

SetName = Annotated[str, Path(description="1-64 of A-Z a-z 0-9 _ . -, starting with a letter "
                              "or digit", max_length=64)]


@router.get("", response_model=list[SetPublic])
def list_sets(fw: FirewallDep) -> list[SetPublic]:
    return [SetPublic(name=n, rules=k) for n, k in sorted(fw.sets().items())]


@router.get("/{name}", response_model=SetPublic, responses=responses(404))
def get_set(name: SetName, fw: FirewallDep) -> SetPublic:
    size = fw.sets().get(check_set_name(name))
    if size is None:
        raise NotFoundError(f"no set {name!r}")
    return SetPublic(name=name, rules=size)


@router.put("/{name}", response_model=SyncResult | FleetSetWritten,
            responses=responses(409, 415, 502, 503, 507),
            openapi_extra={"requestBody": RULES_BODY})
async def replace_set(
    name: SetName,
    request: Request,
    fw: FirewallDep,
    fleet: FleetDep,
    action: Action = Action.DROP,
    comment: str = "",
    dry_run: Annotated[bool, Query(description="say what would change, change nothing")] = False,
) -> SyncResult:
    """Make the set exactly the body's rules, in one change: added, removed and changed
    rules go in one store transaction, and every new entry is in the maps before any old
    one goes, so an address in the old set and the new one is never unguarded. A rule of
    another set (or of none) with the same match is a conflict (409). An empty body is
    refused: DELETE empties a set. On a fleet node: the fleet set, answered as PUT
    /api/v1/fleet/sets/{name} answers (a dry run compares with what this node enforces);
    rules a fleet set cannot hold are a 409."""
    check_set_name(name)
    doc = await read_rules(request, RuleKind(action=action, comment=comment, set=name))
    if not len(doc):
        raise RuleValidationError(
            f"the body holds no rule: to empty set {name!r}, DELETE /api/v1/sets/{name}")
    if fleet is not None:
        prefixes, kind = await run_in_threadpool(fleet.set_of, name, doc)
        if not dry_run:
            result = await run_in_threadpool(fleet.replace_set, name, prefixes, kind.action,
                                             kind.comment)
            audit(request, f"fleet set {name}: {result['count']} prefixes, revision "
                  f"{result['revision']}")
            return JSONResponse(result)
    report = await run_in_threadpool(fw.replace_set, name, doc, dry_run)
    audit(request, None if dry_run else
          f"set {name}: {report.added} added, {report.removed} removed, {report.changed} "
          f"changed, {report.kept} kept")
    return SyncResult.of(report)


@router.delete("/{name}", response_model=SyncResult | FleetSetDeleted,
               responses=responses(404, 409, 502, 503))
def delete_set(name: SetName, request: Request, fw: FirewallDep, fleet: FleetDep
               ) -> SyncResult:
    """Every rule of the set, in one change. On a fleet node: the fleet set, answered as
    DELETE /api/v1/fleet/sets/{name} answers."""
    if fleet is not None:
        result = fleet.delete_set(check_set_name(name))
        audit(request, f"deleted fleet set {name}: revision {result['revision']}")
        return JSONResponse(result)
    report = fw.delete_where(rule_set=check_set_name(name))
    audit(request, f"deleted set {name}: {report.removed} rules")
    return SyncResult.of(report)

