"""/api/v1/audit: the audit trail (xdpfw/audit.py), oldest first."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel

from xdpfw.errors import RuleValidationError

router = APIRouter(prefix="/api/v1/audit", tags=["audit"])


class AuditPublic(BaseModel):
    id: int
    time: float
    client: str
    action: str
    detail: str


@router.get("", response_model=list[AuditPublic])
def audit_trail(
    request: Request,
    since: Annotated[str, Query(description="Unix time, or an ISO 8601 time (UTC unless it "
                                "says otherwise)")] = "0",
    after: Annotated[int, Query(ge=0, description="only records with a higher id (paging)")] = 0,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
) -> list[AuditPublic]:
    records = request.app.state.audit_log.since(_when(since), after, limit)
    return [AuditPublic(**vars(r)) for r in records]


def _when(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        pass
    try:
        t = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise RuleValidationError(f"since={text!r} is neither Unix time nor ISO 8601") from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=UTC)
    return t.timestamp()
