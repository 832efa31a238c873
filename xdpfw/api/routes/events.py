"""/api/v1/events: sampled drop events as server-sent events; their sample rate."""

from __future__ import annotations

import asyncio
import json

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from xdpfw.api.error_body import responses

# Every route: 503 when no event reader runs (an app not run by `xdpfw serve`).
router = APIRouter(prefix="/api/v1/events", tags=["events"], responses=responses(503))

KEEPALIVE_S = 15.0


class EventConfig(BaseModel):
    sample_rate: int = Field(ge=0, le=1 << 30, description="1 drop in N is sampled; 0: off")


class EventStatus(EventConfig):
    subscribers: int
    read: int
    dropped_slow_client: int


def _hub(request: Request):
    hub = request.app.state.events
    if hub is None:
        raise HTTPException(503, "drop events are not available (no event reader is running)")
    return hub


@router.get("", response_class=StreamingResponse)
async def stream(request: Request) -> StreamingResponse:
    """`data: {json}` per sampled drop. A client that reads too slowly loses its oldest events
    and is told so with `{"type": "lagged", "missed": N}`."""
    hub = _hub(request)
    sub = hub.subscribe(asyncio.get_running_loop())

    async def events():
        try:
            yield ": subscribed\n\n"
            while True:
                try:
                    await asyncio.wait_for(sub.wake.wait(), KEEPALIVE_S)
                except TimeoutError:
                    yield ": keep-alive\n\n"
                    continue
                sub.wake.clear()
                if hub.ended:
                    return
                if sub.missed:
                    missed, sub.missed = sub.missed, 0
                    yield f"data: {json.dumps({'type': 'lagged', 'missed': missed})}\n\n"
                while sub.queue:
                    yield f"data: {json.dumps(sub.queue.popleft())}\n\n"
        finally:
            hub.unsubscribe(sub)

    return StreamingResponse(
        events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
    )


@router.get("/config", response_model=EventStatus)
def get_config(request: Request) -> EventStatus:
    return EventStatus(**_hub(request).metrics())


@router.put("/config", response_model=EventStatus)
def set_config(body: EventConfig, request: Request) -> EventStatus:
    hub = _hub(request)
    hub.set_sample_rate(body.sample_rate)
    return EventStatus(**hub.metrics())
