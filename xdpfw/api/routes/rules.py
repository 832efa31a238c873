"""/api/v1/rules: block and allow rules by source prefix."""

from __future__ import annotations

import itertools
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Request, status
from fastapi.concurrency import run_in_threadpool
from pydantic import ValidationError

from xdpfw.api.deps import FirewallDep
from xdpfw.api.schemas import (
    BulkPrefixes,
    BulkResult,
    BulkRules,
    RuleCreate,
    RuleMatch,
    RulePage,
    RulePublic,
)
from xdpfw.errors import RuleValidationError
from xdpfw.rules.blocklist import iter_prefix_chunks, parse_prefixes
from xdpfw.rules.model import Action, Proto
from xdpfw.service import RuleSpec

router = APIRouter(prefix="/api/v1/rules", tags=["rules"])


@router.post("", status_code=status.HTTP_201_CREATED, response_model=RulePublic)
def add_rule(body: RuleCreate, fw: FirewallDep) -> RulePublic:
    rule = fw.add_rules([body.spec()])[0]
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
    rules = fw.list_rules()
    if action is not None:
        rules = [r for r in rules if r.action is action]
    if proto is not None:
        rules = [r for r in rules if r.proto is proto]
    if prefix is not None:
        rules = [r for r in rules if str(r.prefix) == prefix]
    if comment is not None:
        rules = [r for r in rules if comment in r.comment]
    page = rules[offset : offset + limit]
    return RulePage(
        items=[RulePublic.of(r, fw.rule_counter(r)) for r in page],
        total=len(rules),
        limit=limit,
        offset=offset,
    )


@router.get("/{rule_id}", response_model=RulePublic)
def get_rule(rule_id: int, fw: FirewallDep) -> RulePublic:
    rule = fw.get_rule(rule_id)
    return RulePublic.of(rule, fw.rule_counter(rule))


@router.delete("/{rule_id}", response_model=RulePublic)
def delete_rule(rule_id: int, fw: FirewallDep) -> RulePublic:
    rule = fw.get_rule(rule_id)
    counters = fw.rule_counter(rule)
    fw.delete_rule(rule_id)
    return RulePublic.of(rule, counters)


@router.post(
    "/bulk",
    status_code=status.HTTP_201_CREATED,
    response_model=BulkResult,
    openapi_extra={
        "requestBody": {
            "content": {
                "application/json": {
                    "schema": {
                        "oneOf": [
                            BulkPrefixes.model_json_schema(),
                            BulkRules.model_json_schema(),
                        ]
                    }
                },
                "text/plain": {"schema": {"type": "string"}},
            }
        }
    },
)
async def add_bulk(
    request: Request,
    fw: FirewallDep,
    action: Action = Action.DROP,
    comment: str = "",
) -> BulkResult:
    """Many rules at once, all or nothing: a JSON body `{"prefixes": [...], "action": ...}` or
    `{"rules": [...]}`, or a plain-text blocklist (one prefix per line, `#` comments; the
    query's `action` and `comment` apply to every line)."""
    body = await request.body()
    ctype = request.headers.get("content-type", "").split(";")[0].strip()
    if ctype == "text/plain":
        try:
            text = body.decode()
        except UnicodeDecodeError as e:
            raise RuleValidationError(
                f"the blocklist is not UTF-8 text (byte {e.start}: {body[e.start:e.start + 1]!r})"
            ) from None
        # Parsed chunk by chunk while the kernel takes the chunks before (see the service).
        chunks = iter_prefix_chunks(text.splitlines())
        rules = await run_in_threadpool(fw.add_prefixes_streamed, chunks, action, comment)
        if not rules:
            raise RuleValidationError("the blocklist holds no prefix")
    elif ctype in ("application/json", ""):
        specs = await run_in_threadpool(_json_specs, body)
        rules = await run_in_threadpool(fw.add_rules, specs)
    else:
        raise HTTPException(
            status.HTTP_415_UNSUPPORTED_MEDIA_TYPE,
            f"send text/plain (a blocklist) or application/json, not {ctype}",
        )
    return BulkResult(added=len(rules), first_id=rules[0].id, last_id=rules[-1].id)


def _json_specs(body: bytes) -> list[RuleSpec]:
    try:
        if b'"rules"' in body[:64]:
            return [r.spec() for r in BulkRules.model_validate_json(body).rules]
        bulk = BulkPrefixes.model_validate_json(body)
    except ValidationError as e:
        raise RuleValidationError(_first_error(e)) from None
    match = RuleMatch(action=bulk.action, proto=bulk.proto, dport=bulk.dport)
    prefixes = parse_prefixes(bulk.prefixes, source="prefixes item")
    return _plain_specs(prefixes, match.action, match.proto, match.dport, bulk.comment)


def _plain_specs(prefixes, action, proto, dport, comment) -> list[RuleSpec]:
    """RuleSpecs sharing one match, built by tuple.__new__ through map(): no Python call per
    rule on a million-line blocklist."""
    same = (itertools.repeat(v, len(prefixes)) for v in (action, proto, dport, comment))
    rows = zip(prefixes, *same, strict=True)
    return list(map(tuple.__new__, itertools.repeat(RuleSpec), rows))


def _first_error(e: ValidationError) -> str:
    err = e.errors()[0]
    where = ".".join(str(p) for p in err["loc"])
    return f"{where}: {err['msg']}" if where else err["msg"]
