"""/api/v1/config/reload: make the rules equal to the config file's [[rules]] and [[sets]]
again (`xdpfw reload`), when [state] rules_from_config is on. The daemon reads the file it
was started with (and the set files it names); the request names no path."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool

from xdpfw.api.audit import audit
from xdpfw.api.deps import FirewallDep
from xdpfw.api.error_body import responses
from xdpfw.api.schemas import SyncResult
from xdpfw.config import load_config
from xdpfw.declared import declared_rules
from xdpfw.errors import ConflictError

router = APIRouter(prefix="/api/v1/config", tags=["config"])


@router.post("/reload", response_model=SyncResult, responses=responses(409, 503, 507))
async def reload_rules(
    request: Request,
    fw: FirewallDep,
    dry_run: Annotated[bool, Query(description="say what would change, change nothing")] = False,
) -> SyncResult:
    """The file is read again and checked whole (a mistake is a 422 naming its line, and
    nothing changes); only the rules are applied: other settings take a restart."""
    path = request.app.state.config_path
    if path is None or fw.rules_source is None:
        raise ConflictError("the rules do not come from a config file ([state] "
                            "rules_from_config is off): change them through the API")

    def read():
        cfg = load_config(path)
        if not cfg.state.rules_from_config:
            raise ConflictError(f"{path} turns rules_from_config off: that takes a restart "
                                "(nothing was changed)")
        return declared_rules(cfg, path)

    doc = await run_in_threadpool(read)
    report = await run_in_threadpool(fw.sync_config, doc, str(path), dry_run)
    audit(request, None if dry_run else
          f"rules from {path}: {report.added} added, {report.removed} removed, "
          f"{report.changed} changed, {report.kept} kept")
    return SyncResult.of(report)
