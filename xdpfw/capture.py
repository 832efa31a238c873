"""Packet capture: frames the XDP program copies into its capture ring, handed to the clients
of `GET /api/v1/capture` (and so `xdpfw capture`) as they come.

The kernel does the filtering (xdpfw.c: capture()), so it copies only packets some capture
wants, and is bounded: at most `rate` packets a second per CPU after a burst, `snaplen`
bytes each, into a ring of fixed size. With no capture running the program pays one test of
a flag per packet. Several captures may run at once: the kernel then takes the union of
their filters and each session filters again here.

Sessions have bounded queues: a client that reads too slowly loses packets (counted), and
the ring's reader never blocks on it. Nor does it take the hub's lock: it reads `_view`, a
tuple replaced whole on every change, because the reader's thread is joined (on the last
close, and by an upgrade under the Dataplane's lock) by threads that may hold that lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from xdpfw.dataplane import abi
from xdpfw.dataplane.dataplane import Dataplane
from xdpfw.dataplane.ringbuf import RingReader
from xdpfw.errors import ConflictError

log = logging.getLogger(__name__)

XDP_ABORTED, XDP_DROP, XDP_PASS, XDP_TX, XDP_REDIRECT = range(5)
VERDICT_NAMES = {XDP_ABORTED: "aborted", XDP_DROP: "drop", XDP_PASS: "pass", XDP_TX: "tx",
                 XDP_REDIRECT: "redirect"}
# What `verdict=` selects: "pass" is every packet let through, to the stack or forwarded.
VERDICTS = {
    "drop": frozenset({XDP_DROP}),
    "pass": frozenset({XDP_PASS, XDP_TX, XDP_REDIRECT}),
    "any": frozenset(VERDICT_NAMES),
}
REASON_CODES = {name: code for code, name in abi.REASON_NAMES.items()}


@dataclass(frozen=True)
class CaptureFilter:
    iface: int | None = None  # interface slot; None: every interface
    rule_slot: int | None = None  # counter slot of the deciding rule; None: any
    reasons: frozenset[int] = frozenset(abi.REASON_NAMES)
    verdicts: frozenset[int] = VERDICTS["drop"]
    snaplen: int = abi.CAPTURE_MAX_SNAPLEN

    def matches(self, r: Captured) -> bool:
        return ((self.iface is None or r.iface == self.iface)
                and (self.rule_slot is None or r.rule_slot == self.rule_slot)
                and r.reason in self.reasons and r.verdict in self.verdicts)


@dataclass(frozen=True)
class Captured:
    ts_ns: int  # wall clock
    data: bytes
    orig_len: int
    iface: int
    rule_slot: int | None
    reason: int
    verdict: int


@dataclass(eq=False)
class Session:
    filter: CaptureFilter
    loop: asyncio.AbstractEventLoop
    queue: deque
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    missed: int = 0  # packets dropped because this client lagged


@dataclass(frozen=True)
class RateLimit:
    rate: int = 10_000  # packets per second, per CPU
    burst: int = 2_000  # packets a CPU may take back to back

    def intervals(self) -> tuple[int, int]:
        """(interval_ns, burst_ns) of capture_cfg."""
        interval = 1_000_000_000 // max(self.rate, 1)
        return interval, (max(self.burst, 1) - 1) * interval


def kernel_filter(filters: list[CaptureFilter], limit: RateLimit) -> abi.CaptureCfg:
    """The one filter the program applies: what any of the sessions wants."""
    ifaces = {f.iface for f in filters}
    rules = {f.rule_slot for f in filters}
    interval, burst = limit.intervals()
    return abi.CaptureCfg(
        iface=ifaces.pop() if len(ifaces) == 1 and None not in ifaces else abi.CAPTURE_ANY,
        rule_slot=rules.pop() if len(rules) == 1 and None not in rules else abi.CAPTURE_ANY,
        reasons=sum(1 << r for r in set().union(*(f.reasons for f in filters))),
        verdicts=sum(1 << v for v in set().union(*(f.verdicts for f in filters))),
        snaplen=max(f.snaplen for f in filters),
        interval_ns=interval,
        burst_ns=burst,
    )


# struct capture_record's header: ts_ns, pkt_len, cap_len, iface, rule_slot, reason, verdict.
_HEADER = struct.Struct("<QIIIIBB6x")
assert _HEADER.size == abi.CAPTURE_HEADER, "capture_record's header differs from abi.py"


def parse_record(raw: bytes, clock_offset_ns: int) -> Captured:
    ts, pkt_len, cap_len, iface, rule_slot, reason, verdict = _HEADER.unpack_from(raw)
    data = raw[_HEADER.size:_HEADER.size + cap_len]
    return Captured(ts + clock_offset_ns, data, pkt_len, iface,
                    None if rule_slot == abi.NO_RULE else rule_slot, reason, verdict)


def clock_offset_ns() -> int:
    """Wall clock minus CLOCK_MONOTONIC (bpf_ktime_get_ns), to stamp packets."""
    return time.clock_gettime_ns(time.CLOCK_REALTIME) - time.clock_gettime_ns(
        time.CLOCK_MONOTONIC)


class CaptureHub:
    def __init__(self, dataplane: Dataplane, limit: RateLimit | None = None,
                 max_sessions: int = 4, queue_size: int = 4096) -> None:
        self.dp = dataplane
        self.limit = limit or RateLimit()
        self.max_sessions = max_sessions
        self.queue_size = queue_size
        self.lock = threading.Lock()
        self.sessions: set[Session] = set()
        self._view: tuple[Session, ...] = ()  # what the reader's thread reads
        self._reader: RingReader | None = None
        self._offset = clock_offset_ns()
        self.delivered = 0
        self.dropped_slow_client = 0
        self.ended = False

    def open(self, flt: CaptureFilter, loop: asyncio.AbstractEventLoop) -> Session:
        """Start capturing what `flt` selects; the kernel copies from when this returns."""
        with self.lock:
            if self.ended:
                raise ConflictError("the daemon is stopping")
            if len(self.sessions) >= self.max_sessions:
                raise ConflictError(f"{len(self.sessions)} captures are running already (at "
                                    f"most {self.max_sessions} at once): stop one first")
            session = Session(flt, loop, deque(maxlen=self.queue_size))
            self.sessions.add(session)
            self._apply()
        return session

    def close(self, session: Session) -> None:
        with self.lock:
            if session not in self.sessions:
                return
            self.sessions.discard(session)
            idle = self._apply()
        self._stop_reader(idle)

    def _apply(self) -> RingReader | None:
        """Under the lock: the kernel's filter and the reader follow the sessions. Returns a
        reader no session needs any more, for the caller to stop once the lock is released."""
        self._view = tuple(self.sessions)
        if self.sessions:
            self._offset = clock_offset_ns()
            if self._reader is None:
                self._reader = self.dp.read_ring("capture_ring", self._on_record, wakeups=True)
            self.dp.capture.start(kernel_filter([s.filter for s in self.sessions], self.limit))
            return None
        self.dp.capture.stop()
        idle, self._reader = self._reader, None
        return idle

    def _stop_reader(self, reader: RingReader | None) -> None:
        if reader is not None:
            self.dp.stop_events(reader)

    def _on_record(self, raw: bytes) -> None:
        try:
            rec = parse_record(raw, self._offset)
        except Exception as e:  # a bad record must not stop the reader
            log.warning("undecodable capture record (%d bytes): %s", len(raw), e)
            return
        for s in self._view:
            if not s.filter.matches(rec):
                continue
            if len(s.queue) == s.queue.maxlen:  # the deque drops the oldest
                s.missed += 1
                self.dropped_slow_client += 1
            if s.filter.snaplen < len(rec.data):
                rec = Captured(rec.ts_ns, rec.data[:s.filter.snaplen], rec.orig_len,
                               rec.iface, rec.rule_slot, rec.reason, rec.verdict)
            s.queue.append(rec)
            self.delivered += 1
            with contextlib.suppress(RuntimeError):  # its loop is closed already
                s.loop.call_soon_threadsafe(s.wake.set)

    def end_streams(self) -> None:
        """The daemon is stopping: every capture stream ends now."""
        with self.lock:
            self.ended = True
            sessions = list(self.sessions)
        for s in sessions:
            with contextlib.suppress(RuntimeError):
                s.loop.call_soon_threadsafe(s.wake.set)

    def stop(self) -> None:
        with self.lock:
            self.ended = True
            self.sessions.clear()
            idle = self._apply()
        self._stop_reader(idle)

    def status(self) -> dict:
        totals = self.dp.capture.totals()
        with self.lock:
            return {
                "running": len(self.sessions),
                "max_sessions": self.max_sessions,
                "rate": self.limit.rate,
                "burst": self.limit.burst,
                "max_snaplen": abi.CAPTURE_MAX_SNAPLEN,
                "delivered": self.delivered,
                "dropped_slow_client": self.dropped_slow_client,
                "kernel": {k: {"packets": p, "bytes": b} for k, (p, b) in totals.items()},
            }
