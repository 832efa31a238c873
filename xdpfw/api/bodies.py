"""Request bodies that carry many rules, read into a RuleDocument: every endpoint that takes
a list of rules (POST /api/v1/rules/bulk, PUT /api/v1/rules, PUT /api/v1/sets/{name}) takes
the same forms:
- text/plain: a blocklist (one prefix per line; the query's action, comment and set apply),
  or an export's sections (xdpfw/rules/document.py);
- JSON: an export ({"format": "xdpfw-rules", ...}), {"prefixes": [...], "action": ...}
  (one kind for all), or {"rules": [{"prefix": ..., ...}, ...]}.
"""

from __future__ import annotations

import re

import numpy as np
from fastapi import HTTPException, Request, status
from fastapi.concurrency import run_in_threadpool
from pydantic import ValidationError

from xdpfw.api.schemas import BulkPrefixes, BulkRules
from xdpfw.errors import RuleValidationError
from xdpfw.rules import document as D
from xdpfw.rules.kind import RuleKind
from xdpfw.rules.model import parse_prefix
from xdpfw.rules.table import Prefixes

FIRST_KEY = re.compile(rb'\s*\{\s*"([a-z_]{1,16})"\s*:')
FORMS = ("text/plain (a blocklist, or an export's sections), or JSON: an export, "
         '{"prefixes": [...], "action": ...} or {"rules": [...]}')


# The OpenAPI requestBody of these endpoints (they read their body themselves).
RULES_BODY = {
    "content": {
        "text/plain": {"schema": {"type": "string"}},
        "application/json": {"schema": {"oneOf": [
            D.JsonDocument.model_json_schema(), BulkPrefixes.model_json_schema(),
            BulkRules.model_json_schema()]}},
    }
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
    """The form is chosen by the object's first key (a million-item body is parsed once)."""
    first = _first_key(body)
    if first in ("format", "version", "sections"):
        return D.parse_json(body)
    try:
        if first == "rules":
            return _from_rules(BulkRules.model_validate_json(body))
        bulk = BulkPrefixes.model_validate_json(body)
    except ValidationError as e:
        raise RuleValidationError(D.first_error(e)) from None
    kind = RuleKind.model_validate(bulk.model_dump(exclude={"prefixes"}))
    return D.RuleDocument([D.Section(D.prefixes_of(bulk.prefixes, "prefixes item"), kind)])


def _first_key(body: bytearray) -> str | None:
    m = FIRST_KEY.match(body)
    return m.group(1).decode() if m else None


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
