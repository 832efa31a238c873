"""/api/v1/rules: block and allow rules by source prefix."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request, Response, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from pydantic import ValidationError

from xdpfw.api.audit import audit
from xdpfw.api.bodies import RULES_BODY, read_rules
from xdpfw.api.deps import FirewallDep
from xdpfw.api.error_body import responses, validation_detail
from xdpfw.api.schemas import (
    BulkResult,
    RuleCreate,
    RulePage,
    RulePublic,
    RuleSelection,
    SyncResult,
)
from xdpfw.errors import RuleValidationError
from xdpfw.rules import document
from xdpfw.rules.kind import RuleKind
from xdpfw.rules.model import Action, Proto, parse_prefix
from xdpfw.service import SyncReport

router = APIRouter(prefix="/api/v1/rules", tags=["rules"])


@router.post("", status_code=status.HTTP_201_CREATED, response_model=RulePublic,
             responses=responses(409, 503, 507))
def add_rule(body: RuleCreate, request: Request, fw: FirewallDep,
             response: Response) -> RulePublic:
    rule = fw.add_rules([body.spec()])[0]
    response.headers["Location"] = f"{router.prefix}/{rule.id}"
    audit(request, f"added rule {rule.id}: {describe(rule)}")
    return RulePublic.of(rule, (0, 0))


@router.get("", response_model=RulePage)
def list_rules(
    fw: FirewallDep,
    action: Action | None = None,
    proto: Proto | None = None,
    prefix: Annotated[str | None, Query(description="exact prefix, e.g. 10.0.0.0/8")] = None,
    comment: Annotated[str | None, Query(description="substring of the comment")] = None,
    rule_set: Annotated[str | None, Query(
        alias="set", description="rules of this set ('': rules in no set)")] = None,
    covering: Annotated[str | None, Query(
        description="an address (or prefix): the rules whose prefix contains it, in the "
        "order they decide (longest prefix, then most specific)")] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> RulePage:
    exact = parse_prefix(prefix) if prefix is not None else None
    inside = parse_prefix(covering) if covering is not None else None
    total, page = fw.select_rules(offset, limit, action=action, proto=proto, prefix=exact,
                                  comment=comment, rule_set=rule_set, covering=inside)
    return RulePage(
        items=[RulePublic.of(r, fw.rule_counter(r)) for r in page],
        total=total,
        limit=limit,
        offset=offset,
    )


@router.get("/export")
def export_rules(
    fw: FirewallDep,
    fmt: Annotated[Literal["text", "json"], Query(alias="format")] = "text",
) -> StreamingResponse:
    """Every rule, with its set, comment and match, as `PUT /api/v1/rules` (and `POST
    /api/v1/rules/bulk`) take them back: text sections or JSON (xdpfw/rules/document.py).
    The rules are copied under the lock, then written out as they stream."""
    ex = fw.export()
    if fmt == "json":
        return StreamingResponse(document.write_json(ex), media_type="application/json")
    return StreamingResponse(document.write_text(ex), media_type="text/plain")


@router.get("/{rule_id}", response_model=RulePublic, responses=responses(404))
def get_rule(rule_id: int, fw: FirewallDep) -> RulePublic:
    rule = fw.get_rule(rule_id)
    return RulePublic.of(rule, fw.rule_counter(rule))


@router.delete("/{rule_id}", response_model=RulePublic, responses=responses(404, 409, 503))
def delete_rule(rule_id: int, request: Request, fw: FirewallDep) -> RulePublic:
    rule = fw.get_rule(rule_id)
    counters = fw.rule_counter(rule)
    fw.delete_rule(rule_id)
    audit(request, f"deleted rule {rule.id}: {describe(rule)}")
    return RulePublic.of(rule, counters)


def describe(rule) -> str:
    match = f" {rule.proto.value}" + (f"/{rule.dport}" if rule.dport else "") \
        if rule.proto else ""
    in_set = f" in set {rule.rule_set}" if rule.rule_set else ""
    return f"{rule.prefix}{match} {rule.action.value}{in_set}"


@router.post(
    "/bulk",
    status_code=status.HTTP_201_CREATED,
    response_model=BulkResult,
    responses=responses(409, 415, 503, 507),
    openapi_extra={"requestBody": RULES_BODY},
)
async def add_bulk(
    request: Request,
    fw: FirewallDep,
    action: Action = Action.DROP,
    comment: str = "",
    rule_set: Annotated[str, Query(alias="set",
                                   description="the set a blocklist's rules join")] = "",
    skip_existing: Annotated[bool, Query(
        description="leave out rules whose match exists already, instead of refusing")] = False,
) -> BulkResult:
    """Many rules at once, all or nothing (bodies.py: a blocklist, an export, or JSON; the
    query's `action`, `comment` and `set` apply to a blocklist's lines)."""
    doc = await read_rules(request, _kind(action, comment, rule_set))
    if not len(doc):
        raise RuleValidationError("the request holds no rule: no prefix in it")
    ids = await run_in_threadpool(fw.add_document, doc, skip_existing)
    audit(request, f"added {len(ids)} rules" + (f" (ids {ids[0]}-{ids[-1]})" if ids else "")
          + (f", {len(doc) - len(ids)} existing skipped" if skip_existing else ""))
    return BulkResult(added=len(ids), first_id=ids[0] if ids else None,
                      last_id=ids[-1] if ids else None, skipped=len(doc) - len(ids))


@router.put("", response_model=SyncResult, responses=responses(409, 415, 503, 507),
            openapi_extra={"requestBody": RULES_BODY})
async def replace_rules(
    request: Request,
    fw: FirewallDep,
    action: Action = Action.DROP,
    comment: str = "",
    dry_run: Annotated[bool, Query(description="say what would change, change nothing")] = False,
) -> SyncResult:
    """Make the rules exactly the body's (an export, `xdpfw rules import --replace`), in one
    change: rules in both keep their ids and counters; a prefix in both keeps its entry."""
    doc = await read_rules(request, _kind(action, comment, ""))
    report = await run_in_threadpool(fw.replace_all, doc, dry_run)
    if not dry_run:
        audit(request, f"replaced every rule: {_counts(report)}")
    return SyncResult.of(report)


@router.post("/delete", response_model=SyncResult, responses=responses(404, 409, 503))
def delete_many(body: RuleSelection, request: Request, fw: FirewallDep) -> SyncResult:
    """Delete in one change the rules listed by id (all must exist), or those of a set, or
    those whose comment is exactly the one given."""
    report = fw.delete_where(ids=body.ids, rule_set=body.set, comment=body.comment)
    audit(request, f"deleted {report.removed} rules ({body.describe()})")
    return SyncResult.of(report)


def _kind(action: Action, comment: str, rule_set: str) -> RuleKind:
    try:
        return RuleKind(action=action, comment=comment, set=rule_set)
    except ValidationError as e:
        raise RuleValidationError(validation_detail(e.errors())[0]) from None


def _counts(r: SyncReport) -> str:
    return f"{r.added} added, {r.removed} removed, {r.changed} changed, {r.kept} kept"
