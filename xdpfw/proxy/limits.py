"""What proxied connections may hold, shared by every engine of a daemon (Budgets), and the
watch that holds each connection to it (PairWatch, with a Direction per spliced direction).

Connections: each holds two of the daemon's descriptors, and the API needs some too; at
ProxyLimits.max_connections engines stop accepting (the listen backlog, then the client's SYN
retries, hold the rest); one client address (an IPv6 /64) holds at most
max_per_client of them, and its connections past that are reset as they are accepted
(ClientCounts). Bytes: the kernel has no backpressure for a splice: bytes read from
one socket queue on the other's psock without limit when its peer reads more slowly
(docs/perf.md, Socket proxy). So each direction's queue is measured; past a quarter of
max_queued the sender's TCP window is clamped (backpressure), and a connection still over
max_queued a second later is reset. Over all connections, past max_queued_total the clamp
comes sooner, and a second later connections holding more than their share are reset: one
connection lost rather than the appliance's memory. Time: a connection with no byte either
way for idle_timeout is reset (a client that vanished without a FIN, or one holding a slot).
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass

from xdpfw.clients import ClientCounts, per_client_cap
from xdpfw.proxy import tcpinfo
from xdpfw.proxy.abi import SP_MAX_SOCKETS

MiB = 1024 * 1024
DEFAULT_MAX_QUEUED = 64 * MiB  # per connection and direction: [lb] proxy_max_queued_mib
DEFAULT_MAX_QUEUED_TOTAL = 1024 * MiB  # over all of them: proxy_max_queued_total_mib
DEFAULT_MAX_CONNECTIONS = SP_MAX_SOCKETS // 2  # proxy_max_connections (daemon.proxy_limits)
DEFAULT_IDLE_TIMEOUT_S = 300.0  # proxy_idle_timeout_s
QUEUE_GRACE_S = 1.0  # over a limit this long: reset
# How often a spliced connection's queue is measured (6 syscalls): every QUEUE_CHECK_MIN_S
# while it holds more than 1/16 of max_queued or is clamped, else at an interval that doubles
# up to QUEUE_CHECK_MAX_S: an idle connection costs a check a second, and a peer that stops
# reading is seen within a second of its send buffer filling.
QUEUE_CHECK_MIN_S = 0.02
QUEUE_CHECK_MAX_S = 1.0
UNCLAMPED = 65535 << 14  # the kernel's largest window (TCP_MAX_WSCALE)


@dataclass(frozen=True)
class ProxyLimits:
    """[lb] proxy_max_queued_mib, proxy_max_queued_total_mib, proxy_max_connections,
    proxy_max_connections_per_client and proxy_idle_timeout_s, in bytes, connections and
    seconds (0: no idle timeout; max_per_client 0: no cap)."""

    max_queued: int = DEFAULT_MAX_QUEUED
    max_queued_total: int = DEFAULT_MAX_QUEUED_TOTAL
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT_S
    max_per_client: int = per_client_cap(None, DEFAULT_MAX_CONNECTIONS)


class ConnectionBudget:
    """Connections in use against a limit, shared by the engines of every proxy service (on
    different threads). The last quarter of it is kept for services under their fair share
    (the limit over the services registered), so that a flood at one VIP leaves the others a
    quarter of the slots; a service alone may use them all."""

    RESERVE_DIVISOR = 4

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._used = 0
        self._held: dict[int, int] = {}  # by registered service id
        self._lock = threading.Lock()

    def register(self, service_id: int) -> None:
        with self._lock:
            self._held.setdefault(service_id, 0)

    def unregister(self, service_id: int) -> None:
        """Once the service's engine has stopped (its connections given back)."""
        with self._lock:
            self._held.pop(service_id, None)

    def take(self, service_id: int) -> bool:
        with self._lock:
            held = self._held.get(service_id, 0)
            fair = max(self.limit // max(len(self._held), 1), 1)
            reserve = self.limit // self.RESERVE_DIVISOR
            if self._used >= self.limit or (self._used >= self.limit - reserve
                                             and held >= fair):
                return False
            self._held[service_id] = held + 1
            self._used += 1
            return True

    def give(self, service_id: int) -> None:
        with self._lock:
            self._used -= 1
            if service_id in self._held:
                self._held[service_id] -= 1


@dataclass(frozen=True)
class Pressure:
    """All spliced directions together hold more than the total limit."""

    since: float  # time.monotonic() when the total went over
    share: int  # the total over the directions that hold anything


class QueueBudget:
    """Bytes queued in the kernel over every spliced direction that reports here."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._total = 0
        self._holders = 0
        self._over_since = 0.0
        self._lock = threading.Lock()

    def report(self, old: int, new: int, now: float) -> Pressure | None:
        """One direction's queue went from old to new bytes (both >= 0)."""
        with self._lock:
            self._total += new - old
            self._holders += (new > 0) - (old > 0)
            if self._total <= self.limit:
                self._over_since = 0.0
                return None
            self._over_since = self._over_since or now
            return Pressure(self._over_since, self._total // max(self._holders, 1))


class Budgets:
    """What every engine of a daemon shares."""

    def __init__(self, limits: ProxyLimits | None = None) -> None:
        self.limits = limits or ProxyLimits()
        self.connections = ConnectionBudget(self.limits.max_connections)
        self.clients = ClientCounts(self.limits.max_per_client)
        self.queued = QueueBudget(self.limits.max_queued_total)


@dataclass
class Direction:
    """One direction of a spliced connection: bytes read from src and queued in the kernel
    for dst (tcpinfo.queued). Above a quarter of max_queued (or of the total limit, if less;
    a sixteenth while all directions together are over the total) the source's TCP window is
    clamped to its minimum: the sender may send only about 1 KB per round trip. Below a
    sixteenth it is released. A bulk upload to a backend that reads as fast as it can stays
    well under the limit this way (docs/perf.md); a queue that stays over max_queued, or at
    least its share while the total is over, for QUEUE_GRACE_S is a peer that does not read,
    or reads more slowly than a minimal window brings: check() says why to reset."""

    to: str  # "backend" or "client": who the bytes are for
    src: socket.socket
    dst: socket.socket
    dst_base: int  # dst's tcpinfo.bytes_written before the splice
    limits: ProxyLimits
    budget: QueueBudget
    queued: int = 0  # as last measured and reported to budget
    clamp: int | None = None  # the source's TCP_WINDOW_CLAMP before we clamped it
    over_since: float = 0.0  # when queued went over max_queued (0: it is not)

    def check(self, now: float) -> str | None:
        """Measure, clamp or release; a reason to reset the connection, or None."""
        new = max(tcpinfo.queued(self.src, self.dst, self.dst_base), 0)
        pressure = self.budget.report(self.queued, new, now)
        self.queued = new
        max_queued = self.limits.max_queued
        base = min(max_queued, self.budget.limit)  # what the clamp thresholds are parts of
        if new > base // (16 if pressure else 4):
            if self.clamp is None:  # (0 cannot be set back on a connected socket)
                self.clamp = (self.src.getsockopt(socket.IPPROTO_TCP, socket.TCP_WINDOW_CLAMP)
                              or UNCLAMPED)
            # 1: the kernel raises it to its minimum, half of SOCK_MIN_RCVBUF. Set at every
            # check: receive-buffer autotuning may have raised it since.
            self.src.setsockopt(socket.IPPROTO_TCP, socket.TCP_WINDOW_CLAMP, 1)
        elif self.clamp is not None and new < base // 16:
            self.src.setsockopt(socket.IPPROTO_TCP, socket.TCP_WINDOW_CLAMP, self.clamp)
            self.clamp = None
        if new <= max_queued:
            self.over_since = 0.0
        elif not self.over_since:
            self.over_since = now
        if self.over_since and now - self.over_since >= QUEUE_GRACE_S:
            return (f"{new} bytes queued for a {self.to} that has not read them, over "
                    f"[lb] proxy_max_queued_mib for {now - self.over_since:.1f} s")
        if (pressure and now - pressure.since >= QUEUE_GRACE_S
                and new >= max(pressure.share, base // 16)):
            return (f"{new} bytes queued for a {self.to} that has not read them, at least "
                    f"its share ({pressure.share}) while all spliced connections hold over "
                    f"[lb] proxy_max_queued_total_mib, for {now - pressure.since:.1f} s")
        return None

    def busy(self) -> bool:
        """Worth measuring again soon."""
        return self.clamp is not None or self.queued > self.limits.max_queued // 16

    def release(self) -> None:
        """The connection is over: its queue no longer counts."""
        self.budget.report(self.queued, 0, time.monotonic())
        self.queued = 0


@dataclass(frozen=True)
class Reset:
    """Why a watch ends a connection, and the sp_conns counter that counts it."""

    counter: str  # "queue_resets" or "idle_resets"
    why: str


class PairWatch:
    """One proxied connection's limits: each spliced direction's queue (none when relayed)
    and idleness, read from both sockets' tcpinfo.bytes_received."""

    def __init__(self, client: socket.socket, backend: socket.socket, limits: ProxyLimits,
                 dirs: list[Direction], now: float) -> None:
        self.socks = (client, backend)
        self.idle_timeout = limits.idle_timeout
        self.dirs = dirs
        self.seen = self._received()
        self.last_active = now

    def _received(self) -> tuple[int, ...]:
        return tuple(tcpinfo.bytes_received(s) for s in self.socks)

    def check(self, now: float) -> tuple[Reset | None, bool]:
        """Why to reset the connection (or None), and whether to look again soon."""
        for d in self.dirs:
            if why := d.check(now):
                return Reset("queue_resets", why), True
        seen = self._received()
        if seen != self.seen:
            self.seen, self.last_active = seen, now
        elif self.idle_timeout and now - self.last_active >= self.idle_timeout:
            return Reset("idle_resets", f"no byte either way for {now - self.last_active:.0f} "
                         "s ([lb] proxy_idle_timeout_s)"), False
        return None, any(d.busy() for d in self.dirs)

    def release(self) -> None:
        for d in self.dirs:
            d.release()
