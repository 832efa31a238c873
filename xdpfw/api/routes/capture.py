"""/api/v1/capture: the packets the firewall gives a verdict, as a pcap (or pcapng) stream."""

from __future__ import annotations

import asyncio
import time
from typing import Annotated, Literal

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask

from xdpfw import pcap
from xdpfw.api.deps import FirewallDep
from xdpfw.capture import REASON_CODES, VERDICT_NAMES, VERDICTS, Captured, CaptureFilter
from xdpfw.dataplane import abi
from xdpfw.errors import NotFoundError
from xdpfw.service import Firewall

router = APIRouter(prefix="/api/v1/capture", tags=["capture"])

WAKE_S = 1.0  # how often a quiet stream checks its deadline


def _hub(request: Request):
    hub = request.app.state.capture
    if hub is None:
        raise HTTPException(503, "capture is not available (no capture reader is running)")
    return hub


def capture_filter(fw: Firewall, interface: str | None, netns: str | None, rule: int | None,
                   reasons: list[str], verdict: str | None, snaplen: int) -> CaptureFilter:
    """The session's filter, from names a person gives (404 for unknown ones)."""
    slot = None
    if interface is not None:
        att = next((a for a in fw.interfaces()
                    if a.record.name == interface and a.record.netns == netns), None)
        if att is None:
            ns = f" in namespace {netns}" if netns else ""
            raise NotFoundError(f"no guarded interface {interface}{ns}")
        slot = att.record.slot
    codes = set()
    for name in (r for item in reasons for r in item.split(",") if r):
        if name not in REASON_CODES:
            raise HTTPException(422, f"unknown reason {name!r}: one of "
                                     f"{', '.join(REASON_CODES)}")
        codes.add(REASON_CODES[name])
    # Reasons name their verdict already; without them a capture takes drops.
    verdicts = VERDICTS[verdict or ("any" if codes else "drop")]
    return CaptureFilter(
        iface=slot,
        rule_slot=fw.get_rule(rule).slot if rule is not None else None,
        reasons=frozenset(codes) if codes else frozenset(abi.REASON_NAMES),
        verdicts=verdicts,
        snaplen=snaplen,
    )


def _describe(fw: Firewall, r: Captured) -> tuple[str, str]:
    """(interface name, comment) of a packet, for pcapng."""
    att = fw.interface_at(r.iface)
    iface = (f"{att.record.name}@{att.record.netns}" if att and att.record.netns
             else att.record.name if att else f"slot{r.iface}")
    rule = fw.rule_id_of_slot(r.rule_slot) if r.rule_slot is not None else None
    comment = f"{VERDICT_NAMES.get(r.verdict, r.verdict)}: " \
              f"{abi.REASON_NAMES.get(r.reason, r.reason)}"
    return iface, comment + (f", rule {rule}" if rule is not None else "")


@router.get("", response_class=StreamingResponse, responses={200: {"content": {
    pcap.PCAP_MEDIA_TYPE: {}, pcap.PCAPNG_MEDIA_TYPE: {}}}})
async def capture(
    request: Request,
    fw: FirewallDep,
    interface: str | None = None,
    netns: str | None = None,
    rule: Annotated[int | None, Query(description="rule id")] = None,
    reason: Annotated[list[str], Query(description="reasons (repeat, or comma-separated); "
                                                   "default: every reason")] = [],  # noqa: B006
    verdict: Annotated[Literal["drop", "pass", "any"] | None, Query(
        description="drop (default without reason), pass (to the stack or forwarded), any "
                    "(default with reason)")] = None,
    count: Annotated[int | None, Query(ge=1, le=100_000_000)] = None,
    seconds: Annotated[float | None, Query(gt=0, le=86_400)] = None,
    snaplen: Annotated[int, Query(ge=1, le=abi.CAPTURE_MAX_SNAPLEN)] = abi.CAPTURE_MAX_SNAPLEN,
    format: Literal["pcap", "pcapng"] = "pcap",
) -> StreamingResponse:
    """The packets that match, with their bytes (up to `snaplen`), from when the stream
    starts until `count` packets or `seconds` have passed, or the client goes. The kernel
    copies them at a bounded rate (GET /api/v1/capture/status says how many it refused)."""
    hub = _hub(request)
    flt = capture_filter(fw, interface, netns, rule, reason, verdict, snaplen)
    out = pcap.writer(format, snaplen)
    deadline = time.monotonic() + seconds if seconds else None

    # Armed before the response starts: a client that has read the header may send.
    session = hub.open(flt, asyncio.get_running_loop())

    async def stream():
        try:
            yield out.header()
            sent = 0
            while count is None or sent < count:
                left = WAKE_S if deadline is None else min(WAKE_S, deadline - time.monotonic())
                if left <= 0:
                    return
                try:
                    await asyncio.wait_for(session.wake.wait(), left)
                except TimeoutError:
                    continue
                session.wake.clear()
                if hub.ended:
                    return
                chunk = []
                while session.queue and (count is None or sent < count):
                    r = session.queue.popleft()
                    iface, comment = _describe(fw, r) if format == "pcapng" else ("", "")
                    chunk.append(out.packet(pcap.Packet(r.ts_ns, r.data, r.orig_len, iface,
                                                        comment)))
                    sent += 1
                if chunk:
                    yield b"".join(chunk)
        finally:
            hub.close(session)

    # The background task closes a session whose stream never started (the client went).
    return StreamingResponse(stream(), media_type=out.media_type,
                             headers={"Cache-Control": "no-cache"},
                             background=BackgroundTask(hub.close, session))


@router.get("/status")
def status(request: Request) -> dict:
    """Captures running, the rate limit, and what the kernel captured, refused (rate limit)
    and lost (ring full) since the pins were made."""
    return _hub(request).status()
