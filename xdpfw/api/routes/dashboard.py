"""The dashboard: its static files at /ui/, and the two reads it needs beyond the API's own
(the rules with the most hits over the last minute, and which verdict each reason is)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Query, Request
from starlette.staticfiles import StaticFiles

from xdpfw.api.deps import FirewallDep
from xdpfw.dataplane import abi
from xdpfw.errors import NotFoundError

UI_DIR = Path(__file__).resolve().parent.parent.parent / "ui"
UI_PATH = "/ui"

router = APIRouter(prefix="/api/v1/stats", tags=["stats"])

# The page is self-contained: its scripts, styles and data come from this origin only.
UI_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                               "connect-src 'self'; img-src 'self' data:; "
                               "frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


class UiFiles(StaticFiles):
    """The dashboard's files, with UI_HEADERS. They hold no data: the page asks the API for
    everything, with the token the person types in (so they are served without one)."""

    async def get_response(self, path: str, scope):
        response = await super().get_response(path, scope)
        response.headers.update(UI_HEADERS)
        return response


def ui_files() -> UiFiles:
    return UiFiles(directory=UI_DIR, html=True)


@router.get("/top-rules")
def top_rules(fw: FirewallDep, request: Request,
              limit: Annotated[int, Query(ge=1, le=100)] = 10) -> dict:
    """The rules with the most packets over the last minute (`window_s`: how much of it the
    daemon has seen; readings are taken when asked for)."""
    window, hits = request.app.state.rule_hits.top(limit)
    rules = []
    for h in hits:
        try:
            r = fw.get_rule(h.rule_id)
        except NotFoundError:  # deleted since
            continue
        rules.append({"id": r.id, "prefix": str(r.prefix), "action": r.action.value,
                      "proto": r.proto.value if r.proto else None, "dport": r.dport,
                      "comment": r.comment, "packets": h.packets, "bytes": h.bytes})
    return {"window_s": round(window, 3), "rules": rules}


@router.get("/reasons")
def reasons() -> dict[str, str]:
    """Each reason of /api/v1/stats and the XDP action behind it (drop, pass, tx, redirect)."""
    return {abi.REASON_NAMES[r]: v for r, v in abi.REASON_VERDICTS.items()}
