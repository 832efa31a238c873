"""/api/v1/sets: named sets of rules (a blocklist feed, a partner list), each replaced as a
whole, atomically: PUT makes the set exactly the body (service.Firewall.replace_set)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Request
from fastapi.concurrency import run_in_threadpool

from xdpfw.api.audit import audit
from xdpfw.api.bodies import RULES_BODY, read_rules
from xdpfw.api.deps import FirewallDep
from xdpfw.api.error_body import responses
from xdpfw.api.schemas import SetPublic, SyncResult
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


@router.put("/{name}", response_model=SyncResult, responses=responses(409, 415, 503, 507),
            openapi_extra={"requestBody": RULES_BODY})
async def replace_set(
    name: SetName,
    request: Request,
    fw: FirewallDep,
    action: Action = Action.DROP,
    comment: str = "",
    dry_run: Annotated[bool, Query(description="say what would change, change nothing")] = False,
) -> SyncResult:
    """Make the set exactly the body's rules, in one change: added, removed and changed
    rules go in one store transaction, and every new entry is in the maps before any old
    one goes, so an address in the old set and the new one is never unguarded. A rule of
    another set (or of none) with the same match is a conflict (409). An empty body is
    refused: DELETE empties a set."""
    check_set_name(name)
    doc = await read_rules(request, RuleKind(action=action, comment=comment, set=name))
    if not len(doc):
        raise RuleValidationError(
            f"the body holds no rule: to empty set {name!r}, DELETE /api/v1/sets/{name}")
    report = await run_in_threadpool(fw.replace_set, name, doc, dry_run)
    audit(request, None if dry_run else
          f"set {name}: {report.added} added, {report.removed} removed, {report.changed} "
          f"changed, {report.kept} kept")
    return SyncResult.of(report)


@router.delete("/{name}", response_model=SyncResult, responses=responses(404, 409, 503))
def delete_set(name: SetName, request: Request, fw: FirewallDep) -> SyncResult:
    """Every rule of the set, in one change."""
    report = fw.delete_where(rule_set=check_set_name(name))
    audit(request, f"deleted set {name}: {report.removed} rules")
    return SyncResult.of(report)

