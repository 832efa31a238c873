"""/api/v1/rules: block and allow rules by source prefix."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Request, Response, status
from fastapi.concurrency import run_in_threadpool
from pydantic import ValidationError

from xdpfw.api.deps import FirewallDep, FleetDep
from xdpfw.api.error_body import responses, validation_detail
from xdpfw.api.openapi import body_schema_ref
from xdpfw.api.schemas import (
    BULK_BODY,
    BulkPrefixes,
    BulkResult,
    BulkRules,
    RuleCreate,
    RuleMatch,
    RulePage,
    RulePublic,
)
from xdpfw.errors import RuleValidationError
from xdpfw.fleet.writer import MAX_TXN_RULES
from xdpfw.rules.blocklist import parse_blocklist_bytes, parse_prefixes
from xdpfw.rules.model import Action, Proto, parse_prefix
from xdpfw.rules.table import Prefixes
from xdpfw.service import RuleSpec

router = APIRouter(prefix="/api/v1/rules", tags=["rules"])


@router.post("", status_code=status.HTTP_201_CREATED, response_model=RulePublic,
             responses=responses(409, 502, 503, 507))
def add_rule(body: RuleCreate, fw: FirewallDep, fleet: FleetDep,
             response: Response) -> RulePublic:
    """On a fleet node ([fleet]): written to etcd, answered once etcd has committed it."""
    rule = (fleet or fw).add_rules([body.spec()])[0]
    response.headers["Location"] = f"{router.prefix}/{rule.id}"
    return RulePublic.of(rule, (0, 0))


@router.get("", response_model=RulePage)
def list_rules(
    fw: FirewallDep,
    action: Action | None = None,
    proto: Proto | None = None,
    prefix: Annotated[str | None, Query(description="exact prefix, e.g. 10.0.0.0/8")] = None,
    comment: Annotated[str | None, Query(description="substring of the comment")] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> RulePage:
    exact = parse_prefix(prefix) if prefix is not None else None
    total, page = fw.select_rules(offset, limit, action=action, proto=proto, prefix=exact,
                                  comment=comment)
    return RulePage(
        items=[RulePublic.of(r, fw.rule_counter(r)) for r in page],
        total=total,
        limit=limit,
        offset=offset,
    )


@router.get("/{rule_id}", response_model=RulePublic, responses=responses(404))
def get_rule(rule_id: int, fw: FirewallDep) -> RulePublic:
    rule = fw.get_rule(rule_id)
    return RulePublic.of(rule, fw.rule_counter(rule))


@router.delete("/{rule_id}", response_model=RulePublic,
               responses=responses(404, 502, 503))
def delete_rule(rule_id: int, fw: FirewallDep, fleet: FleetDep) -> RulePublic:
    rule = fw.get_rule(rule_id)
    counters = fw.rule_counter(rule)
    (fleet or fw).delete_rule(rule_id)
    return RulePublic.of(rule, counters)


@router.post(
    "/bulk",
    status_code=status.HTTP_201_CREATED,
    response_model=BulkResult,
    responses=responses(409, 415, 503, 507),
    # The route reads its body itself (text/plain is parsed while the kernel takes chunks),
    # so the JSON forms are documented here: a body with "rules" is BulkRules, any other
    # object BulkPrefixes (schemas.BULK_BODY).
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": body_schema_ref(BulkPrefixes, BulkRules)},
                "text/plain": {"schema": {"type": "string"}},
            },
        }
    },
)
async def add_bulk(
    request: Request,
    fw: FirewallDep,
    fleet: FleetDep,
    action: Action = Action.DROP,
    comment: str = "",
) -> BulkResult:
    """Many rules at once, all or nothing: a JSON body `{"prefixes": [...], "action": ...}` or
    `{"rules": [...]}`, or a plain-text blocklist (one prefix per line, `#` comments; the
    query's `action` and `comment` apply to every line)."""
    body = await read_body(request)
    ctype = request.headers.get("content-type", "").split(";")[0].strip()
    if ctype == "text/plain":
        prefixes = await run_in_threadpool(parse_blocklist_bytes, body)
        del body  # the columns are all that is kept: 30 MiB fewer for the add
        if not len(prefixes):
            raise RuleValidationError("the blocklist holds no prefix")
        ids = await run_in_threadpool(_add_prefixes, fw, fleet, prefixes, action, comment)
    elif ctype in ("application/json", ""):
        ids = await run_in_threadpool(_add_json, fw, fleet, body)
    else:
        raise HTTPException(
            status.HTTP_415_UNSUPPORTED_MEDIA_TYPE,
            f"send text/plain (a blocklist) or application/json, not {ctype}",
        )
    return BulkResult(added=len(ids), first_id=ids[0], last_id=ids[-1])


async def read_body(request: Request) -> bytearray:
    """The body in one buffer grown in place (Request.body() keeps every chunk until it
    joins them: twice a 30 MiB blocklist at once). Its size was bounded by BodyLimits."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
    return body


def _add_json(fw, fleet, body: bytes | bytearray) -> Sequence[int]:
    try:
        bulk = BULK_BODY.validate_json(body)
    except ValidationError as e:
        # The tag the union chose leads each loc; the person wants the field.
        errors = [{**err, "loc": err["loc"][1:]} if err["type"] != "bulk_body" else err
                  for err in e.errors(include_input=False, include_url=False)]
        raise RuleValidationError(validation_detail(errors)[0]) from None
    if isinstance(bulk, BulkRules):
        return [r.id for r in (fleet or fw).add_rules([r.spec() for r in bulk.rules])]
    match = RuleMatch(action=bulk.action, proto=bulk.proto, dport=bulk.dport)
    prefixes = parse_prefixes(bulk.prefixes, source="prefixes item")
    if match.proto is None:  # a blocklist in JSON: columns end to end
        return _add_prefixes(fw, fleet, Prefixes.of(prefixes), match.action, bulk.comment)
    specs = _plain_specs(prefixes, match.action, match.proto, match.dport, bulk.comment)
    return [r.id for r in (fleet or fw).add_rules(specs)]


def _add_prefixes(fw, fleet, prefixes: Prefixes, action: Action,
                  comment: str) -> Sequence[int]:
    if fleet is None:
        return fw.add_prefixes(prefixes, action, comment)
    listed = [prefixes.prefix(i) for i in range(min(len(prefixes), MAX_TXN_RULES + 1))]
    return [r.id for r in fleet.add_rules(_plain_specs(listed, action, None, None, comment))]


def _plain_specs(prefixes, action, proto, dport, comment) -> list[RuleSpec]:
    """RuleSpecs sharing one match, built by tuple.__new__ through map(): no Python call per
    rule on a million-line blocklist."""
    same = (itertools.repeat(v, len(prefixes)) for v in (action, proto, dport, comment))
    rows = zip(prefixes, *same, strict=True)
    return list(map(tuple.__new__, itertools.repeat(RuleSpec), rows))

