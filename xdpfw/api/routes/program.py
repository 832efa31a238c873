"""/api/v1/program (which build runs where, upgrade) and /api/v1/shutdown."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field, model_validator

from xdpfw.api.deps import FirewallDep
from xdpfw.api.error_body import responses
from xdpfw.api.peer import peer_of
from xdpfw.api.upload import staged
from xdpfw.errors import CompileError, VerifierError

router = APIRouter(tags=["program"])


class ProgramPublic(BaseModel):
    id: int
    tag: str
    source: str
    interfaces: list[dict] = Field(
        description="per guarded interface: the program id attached (each interface runs an "
        "instance of the build: `id` is the build's test instance), whether it is this build's, "
        "and the program chained behind it")


class ReloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    source_text: str | None = Field(
        None,
        description="C source to build instead of the installed xdpfw.c: its text, not a path. "
        "Accepted from root on the unix socket only (`xdpfw upgrade --source FILE` sends it).",
    )
    source_name: str = Field(
        "upload.c", pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}\.c$",
        description="the name the compiler's messages give the text",
    )

    @model_validator(mode="before")
    @classmethod
    def _no_paths(cls, data: Any) -> Any:
        if isinstance(data, dict) and "source" in data:
            raise ValueError("the API reads no file: send the program's text as source_text "
                             "(`xdpfw upgrade --source FILE` does)")
        return data


class SwapPublic(BaseModel):
    name: str
    netns: str | None
    old_id: int
    new_id: int


class ReloadResult(BaseModel):
    old_id: int = Field(description="the old build's test instance")
    new_id: int = Field(description="the new build's test instance")
    interfaces: int
    swapped: list[SwapPublic] = Field(description="per interface: the instance ids swapped")


class ShutdownRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    detach: bool = Field(
        False, description="also detach every interface and remove the pinned maps"
    )


@router.get("/api/v1/program", response_model=ProgramPublic)
def program(fw: FirewallDep) -> ProgramPublic:
    build = fw.build()
    ifaces = [{"name": att.record.name, "netns": att.record.netns, "mode": link.mode,
               "prog_id": link.prog_id, "current": link.current,
               "chained_prog_id": link.chained} for att, link in fw.links()]
    return ProgramPublic(id=build.info.id, tag=build.info.tag, source=str(build.source),
                         interfaces=ifaces)


@router.post("/api/v1/program/reload", response_model=ReloadResult, responses=responses(403))
async def reload_program(
    request: Request, fw: FirewallDep, body: ReloadRequest | None = None
) -> ReloadResult:
    """Build and load the program again (a new version after an upgrade of the package) and
    swap it in atomically on every guarded interface, on the same pinned maps. A build the
    verifier rejects leaves the running one in place; the error carries the verifier log.
    That is a 422 for a source sent in the request (the client's to fix), a 500 for the
    installed one."""
    if body is None or body.source_text is None:
        up = await run_in_threadpool(fw.upgrade, None)
    else:
        peer = peer_of(request.scope)
        if peer is None or peer.uid != 0:
            # A program runs on every packet and is compiled as root: a root act.
            raise HTTPException(403, "a program source is accepted only from root on the "
                                "unix socket")
        with staged(body.source_text, body.source_name) as path:
            try:
                up = await run_in_threadpool(fw.upgrade, path)
            except (CompileError, VerifierError) as e:
                raise HTTPException(422, str(e)) from None
    return ReloadResult(old_id=up.old.id, new_id=up.new.id, interfaces=len(up.swapped),
                        swapped=[SwapPublic(**vars(s)) for s in up.swapped])


@router.post("/api/v1/shutdown", status_code=202, responses=responses(503))
def shutdown(request: Request, body: ShutdownRequest | None = None) -> dict:
    """Stop the control plane. The data plane keeps guarding unless `detach` is true."""
    stop = request.app.state.shutdown
    if stop is None:
        raise HTTPException(503, "this API is not run by `xdpfw serve`: nothing to shut down")
    detach = bool(body and body.detach)
    stop(detach)
    return {"stopping": True, "detach": detach}
