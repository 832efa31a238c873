"""Request bodies that carry many rules, read into a RuleDocument: every endpoint that takes
a list of rules (POST /api/v1/rules/bulk, PUT /api/v1/rules, PUT /api/v1/sets/{name}) takes
the same forms:
- text/plain: a blocklist (one prefix per line; the query's action, comment and set apply),
  or an export's sections (xdpfw/rules/document.py);
- JSON, chosen by its keys: an export ({"format": "xdpfw-rules", "sections": ...}),
  {"prefixes": [...], "action": ...} (one kind for all), or {"rules": [{"prefix": ...}]}.
"""

from __future__ import annotations

import numpy as np
from fastapi import HTTPException, Request, status
from fastapi.concurrency import run_in_threadpool
from pydantic import ValidationError

from xdpfw.api.error_body import validation_detail
from xdpfw.api.openapi import body_schema_ref
from xdpfw.api.schemas import BULK_BODY, BulkPrefixes, BulkRules
from xdpfw.errors import RuleValidationError
from xdpfw.rules import document as D
from xdpfw.rules.kind import RuleKind
from xdpfw.rules.model import parse_prefix
from xdpfw.rules.table import Prefixes

FORMS = ("text/plain (a blocklist, or an export's sections), or JSON: an export, "
         '{"prefixes": [...], "action": ...} or {"rules": [...]}')


# The OpenAPI requestBody of these endpoints (they read their body themselves).
RULES_BODY = {
    "required": True,
    "content": {
        "text/plain": {"schema": {"type": "string"}},
        "application/json": {"schema": body_schema_ref(BulkPrefixes, BulkRules,
                                                        D.JsonDocument)},
    },
}


async def read_body(request: Request) -> bytearray:
    """The body in one buffer grown in place (Request.body() keeps every chunk until it
    joins them: twice a 30 MiB blocklist at once). Its size was bounded by BodyLimits."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
    return body


async def read_rules(request: Request, default: RuleKind) -> D.RuleDocument:
    """The request's rules; a bad line or item is a RuleValidationError (422) naming it."""
    body = await read_body(request)
    ctype = request.headers.get("content-type", "").split(";")[0].strip()
    if ctype == "text/plain":
        return await run_in_threadpool(D.parse_text, body, default)
    if ctype not in ("application/json", ""):
        raise HTTPException(status.HTTP_415_UNSUPPORTED_MEDIA_TYPE,
                            f"send {FORMS}; not {ctype}")
    return await run_in_threadpool(_parse_json, body)


def _parse_json(body: bytearray) -> D.RuleDocument:
    try:
        bulk = BULK_BODY.validate_json(body)
    except ValidationError as e:
        # The tag the union chose leads each loc; the person wants the field.
        errors = [{**err, "loc": err["loc"][1:]} if err["type"] != "bulk_body" else err
                  for err in e.errors(include_input=False, include_url=False)]
        raise RuleValidationError(validation_detail(errors)[0]) from None
    if isinstance(bulk, D.JsonDocument):
        return D.from_json(bulk)
    if isinstance(bulk, BulkRules):
        return _from_rules(bulk)
    kind = RuleKind.model_validate(bulk.model_dump(exclude={"prefixes"}))
    return D.RuleDocument([D.Section(D.prefixes_of(bulk.prefixes, "prefixes item"), kind)])


def _from_rules(bulk: BulkRules) -> D.RuleDocument:
    """One section per kind, each remembering where its rules were in the list (ids are
    given in list order)."""
    by_kind: dict[tuple, list[int]] = {}
    for i, r in enumerate(bulk.rules):
        by_kind.setdefault((r.action, r.proto, r.dport, r.comment, r.set), []).append(i)
    sections = []
    for (action, proto, dport, comment, rule_set), where in by_kind.items():
        prefixes = Prefixes.of([parse_prefix(bulk.rules[i].prefix) for i in where])
        kind = RuleKind(action=action, proto=proto, dport=dport, comment=comment, set=rule_set)
        sections.append(D.Section(prefixes, kind, np.array(where, dtype=np.int64)))
    return D.RuleDocument(sections)
