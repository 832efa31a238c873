"""The proxy engine: one listener per service, forwarding each connection to a backend.

In "sockhash" mode user space only accepts, connects and hands the pair to the kernel
(loader.SockProxyDataplane.splice); payload bytes move between the sockets inside the kernel.
User space then waits for each side's FIN (EPOLLRDHUP, without reading), waits until every
byte read on that side has been written on the other, and shuts down the other side's write
half: half-close propagates, and close is the meeting of two half-closes.

In "userspace" mode (or for a single connection the kernel would not splice) relay.py copies
the bytes; fallback.py decides which mode runs. The engine runs its own asyncio loop in a
thread; its public API is synchronous. The listener, the backend sockets and the loop thread
live in network namespace `netns` (None: the caller's).

The kernel has no backpressure for a splice: bytes read from one socket queue on the other's
psock without limit when its peer reads more slowly (docs/perf.md, Socket proxy). So the
engine measures what each spliced connection holds, clamps the sending side's TCP window
while a direction holds a quarter of `max_queued` (backpressure), and resets a connection
that still holds more than `max_queued` a second later: one connection lost rather than the
appliance's memory (_Direction).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import ipaddress
import logging
import select
import socket
import struct
import termios
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from xdpfw.errors import ConflictError, ServiceValidationError, XdpfwError
from xdpfw.netns import thread_in_netns
from xdpfw.proxy.abi import SP_MAX_SOCKETS
from xdpfw.proxy.fallback import RequestedMode, load_or_fall_back
from xdpfw.proxy.loader import (
    SPLICE_SNDBUF,
    ConnCounters,
    SockProxyDataplane,
    SplicedPair,
    SpliceError,
    TrafficCounters,
)
from xdpfw.proxy.relay import RelayCounters, abort, finish_pair, relay_pair

log = logging.getLogger("xdpfw.proxy")

Mode = Literal["sockhash", "userspace"]
PickBackend = Callable[[tuple[str, int]], tuple[str, int]]

TCP_CLOSE = 7  # tcp_info.tcpi_state
TCPI_BYTES_ACKED = 120  # offsets in struct tcp_info (stable uapi)
TCPI_BYTES_RECEIVED = 128
# How long a client refused by every backend gets to read our FIN and close first.
REFUSED_CLIENT_LINGER = 2.0
MiB = 1024 * 1024
# Per spliced connection and direction: bytes the kernel read from one socket and has not yet
# put in the other's send queue. A quarter of it clamps the sender's window; over it for
# QUEUE_GRACE_S resets the connection ([lb] proxy_max_queued_mib).
DEFAULT_MAX_QUEUED = 64 * MiB
QUEUE_GRACE_S = 1.0
# How often a spliced connection's queue is measured (6 syscalls): every QUEUE_CHECK_MIN_S
# while it holds more than 1/16 of max_queued or is clamped, else at an interval that doubles
# up to QUEUE_CHECK_MAX_S: an idle connection costs a check a second, and a peer that stops
# reading is seen within a second of its send buffer filling.
QUEUE_CHECK_MIN_S = 0.02
QUEUE_CHECK_MAX_S = 1.0
# Proxied connections at once, over every engine sharing a ConnectionBudget: each holds two of
# the process's descriptors, and the daemon's API needs some too (daemon.proxy_limits sizes it
# from the open-file limit). At the limit engines stop accepting; the listen backlog, then
# the client's SYN retries, hold the rest.
DEFAULT_MAX_CONNECTIONS = SP_MAX_SOCKETS // 2
ACCEPT_RETRY_S = 0.05


@dataclass(frozen=True)
class ProxyLimits:
    """What the daemon's proxy services may hold: [lb] proxy_max_queued_mib and
    proxy_max_connections, in bytes and connections."""

    max_queued: int = DEFAULT_MAX_QUEUED
    max_connections: int = DEFAULT_MAX_CONNECTIONS


class ConnectionBudget:
    """Connections in use against a limit, shared by engines on different threads."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._used = 0
        self._lock = threading.Lock()

    @property
    def used(self) -> int:
        return self._used

    def take(self) -> bool:
        with self._lock:
            if self._used >= self.limit:
                return False
            self._used += 1
            return True

    def give(self) -> None:
        with self._lock:
            self._used -= 1


class EngineError(XdpfwError):
    """The engine was used out of order (not started, started twice)."""


class ListenError(EngineError, ServiceValidationError):
    """The engine cannot listen on its address (not an address of this host, ...)."""


class AddressInUseError(ConflictError, ListenError):
    """Something else listens on the engine's address already (ConflictError first: its
    HTTP status is ConflictError's)."""


class ConnectionAborted(Exception):
    """A spliced connection was reset or its peer vanished; both sides get a RST."""


@dataclass(frozen=True)
class ServiceCounters:
    """Per-service figures. In sockhash mode `kernel` is read from sp_traffic and
    `connections` from sp_conns (BPF maps); `userspace_*` count bytes this process copied
    (userspace mode, or connections the kernel refused to splice)."""

    service_id: int
    mode: Mode
    connections: ConnCounters
    kernel: TrafficCounters
    userspace_bytes_to_backend: int
    userspace_bytes_to_client: int

    @property
    def bytes_to_backend(self) -> int:
        return self.kernel.bytes_to_backend + self.userspace_bytes_to_backend

    @property
    def bytes_to_client(self) -> int:
        return self.kernel.bytes_to_client + self.userspace_bytes_to_client


@dataclass
class _LocalConns:
    """sp_conns' stand-in when no BPF maps exist (userspace mode)."""

    values: dict[str, int] = field(default_factory=lambda: dict.fromkeys(
        ConnCounters.__dataclass_fields__, 0))
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, **deltas: int) -> None:
        with self.lock:
            for k, d in deltas.items():
                self.values[k] += d

    def snapshot(self) -> ConnCounters:
        with self.lock:
            return ConnCounters(**self.values)


def _inq(sock: socket.socket) -> int:
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0" * 4))[0]


def _outq(sock: socket.socket) -> int:
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0]


def _tcp_info(sock: socket.socket) -> bytes:
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)


def _bytes_received(sock: socket.socket) -> int:
    return struct.unpack_from("Q", _tcp_info(sock), TCPI_BYTES_RECEIVED)[0]


def _bytes_written(sock: socket.socket) -> int:
    """Sequence space queued for sending so far: acked + still in the send queue.

    Acked is read first, so an ACK landing in between makes this undercount (safe: we wait
    a little longer), never overcount. Includes the SYN on an active open; callers subtract
    a baseline taken before the splice.
    """
    acked = struct.unpack_from("Q", _tcp_info(sock), TCPI_BYTES_ACKED)[0]
    return acked + _outq(sock)


def _queued(src: socket.socket, dst: socket.socket, dst_base: int) -> int:
    """Bytes the kernel read from src (handed to the verdict) and not yet in dst's send queue:
    what waits on dst's psock. src is read first, so progress in between undercounts."""
    taken = _bytes_received(src) - _inq(src)
    return taken - (_bytes_written(dst) - dst_base)


def _is_closed(sock: socket.socket) -> bool:
    return _tcp_info(sock)[0] == TCP_CLOSE


class ProxyEngine:
    """Listen on (listen_host, listen_port) and proxy each connection to pick_backend(addr).

    mode: see fallback.py; `mode` reports what actually runs. Pass `dataplane` to share one
    loaded SockProxyDataplane between services; otherwise the engine loads (and unloads) its
    own, sized for max_sockets spliced sockets (two per connection), with `splice_sndbuf`
    (see loader.py). netns: the network namespace to listen and connect in.
    """

    def __init__(
        self,
        listen_host: str,
        listen_port: int,
        pick_backend: PickBackend,
        service_id: int,
        *,
        mode: RequestedMode = "auto",
        dataplane: SockProxyDataplane | None = None,
        netns: str | None = None,
        connect_timeout: float = 5.0,
        backlog: int = 1024,
        max_sockets: int = SP_MAX_SOCKETS,
        splice_sndbuf: int | None = SPLICE_SNDBUF,
        max_queued: int = DEFAULT_MAX_QUEUED,
        budget: ConnectionBudget | None = None,
    ) -> None:
        self.listen_host = listen_host
        self.listen_port = listen_port
        self.pick_backend = pick_backend
        self.service_id = service_id
        self.requested_mode = mode
        self.netns = netns
        self.connect_timeout = connect_timeout
        self.backlog = backlog
        self.max_sockets = max_sockets
        self.splice_sndbuf = splice_sndbuf
        self.max_queued = max_queued
        self.budget = budget or ConnectionBudget(DEFAULT_MAX_CONNECTIONS)
        self._dataplane = dataplane
        self._owns_dataplane = False
        self._mode: Mode | None = None
        self.fallback_reason: str | None = None
        self._relay_counters = RelayCounters()
        self._local_conns = _LocalConns()
        self._listener: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._tasks: set[asyncio.Task] = set()
        self._epoll: select.epoll | None = None
        self._hup_waiters: dict[int, asyncio.Future[int]] = {}

    # --- public API ------------------------------------------------------------------------

    @property
    def mode(self) -> Mode:
        if self._mode is None:
            raise EngineError("engine not started")
        return self._mode

    @property
    def address(self) -> tuple[str, int]:
        """The bound address (useful with listen_port=0)."""
        if self._listener is None:
            raise EngineError("engine not started")
        host, port = self._listener.getsockname()[:2]
        return host, port

    @property
    def dataplane(self) -> SockProxyDataplane | None:
        return self._dataplane if self._mode == "sockhash" else None

    def start(self) -> None:
        if self._thread is not None:
            raise EngineError("engine already started")
        self._mode = self._choose_mode()
        # The listener, and the loop thread that makes the backend sockets, are made inside
        # netns: both belong to it from then on.
        with thread_in_netns(self.netns):
            self._listener = self._listen()
            self._loop = asyncio.new_event_loop()
            ready = threading.Event()
            self._thread = threading.Thread(target=self._run, args=(ready,),
                                            name=f"xdpfw-proxy-{self.service_id}", daemon=True)
            self._thread.start()
        ready.wait()
        log.info("service %d: proxy listening on %s:%d in %s mode", self.service_id,
                 *self.address, self._mode)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop accepting, abort open connections, unload an owned dataplane. Idempotent."""
        if self._thread is None or self._loop is None:
            return
        with contextlib.suppress(RuntimeError):  # loop already closed
            asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(timeout)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout)
        self._thread = None
        if self._listener is not None:
            self._listener.close()
        self._release_dataplane()

    def counters(self) -> ServiceCounters:
        to_backend, to_client = self._relay_counters.snapshot()
        dp = self.dataplane
        if dp is not None:
            conns, kernel = dp.conns(self.service_id), dp.traffic(self.service_id)
        else:
            conns, kernel = self._local_conns.snapshot(), TrafficCounters()
        return ServiceCounters(self.service_id, self.mode, conns, kernel, to_backend, to_client)

    def __enter__(self) -> ProxyEngine:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- set-up ----------------------------------------------------------------------------

    def _choose_mode(self) -> Mode:
        if self.requested_mode == "userspace":
            return "userspace"
        if self._dataplane is None:
            self._dataplane, self.fallback_reason = load_or_fall_back(
                self.requested_mode, self._load_dataplane, f"service {self.service_id}")
            if self._dataplane is None:
                return "userspace"
            self._owns_dataplane = True
        self._dataplane.reset_service(self.service_id)
        return "sockhash"

    def _load_dataplane(self) -> SockProxyDataplane:
        return SockProxyDataplane(max_sockets=self.max_sockets,
                                  splice_sndbuf=self.splice_sndbuf)

    def _listen(self) -> socket.socket:
        family = socket.AF_INET6 if ":" in self.listen_host else socket.AF_INET
        lsock = socket.socket(family, socket.SOCK_STREAM)
        try:
            lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            lsock.bind((self.listen_host, self.listen_port))
            lsock.listen(self.backlog)
            lsock.setblocking(False)
        except OSError as e:
            lsock.close()
            self._release_dataplane()
            where = f" in netns {self.netns}" if self.netns else ""
            hint = (f" (the VIP must be an address of the appliance{where})"
                    if e.errno == errno.EADDRNOTAVAIL else "")
            cls = AddressInUseError if e.errno == errno.EADDRINUSE else ListenError
            raise cls(f"service {self.service_id}: cannot listen on "
                      f"{self.listen_host}:{self.listen_port}: {e}{hint}") from e
        return lsock

    def _release_dataplane(self) -> None:
        if self._owns_dataplane and self._dataplane is not None:
            self._dataplane.close()
            self._dataplane = None
            self._owns_dataplane = False

    def _count(self, **deltas: int) -> None:
        dp = self.dataplane
        if dp is not None:
            dp.add_conns(self.service_id, **deltas)
        else:
            self._local_conns.add(**deltas)

    # --- loop thread -----------------------------------------------------------------------

    def _run(self, ready: threading.Event) -> None:
        loop = self._loop
        assert loop is not None and self._listener is not None
        asyncio.set_event_loop(loop)
        self._epoll = select.epoll()
        loop.add_reader(self._epoll.fileno(), self._on_epoll)
        accept_task = loop.create_task(self._accept_loop(self._listener))
        self._tasks.add(accept_task)
        loop.call_soon(ready.set)
        try:
            loop.run_forever()
        finally:
            loop.remove_reader(self._epoll.fileno())
            self._epoll.close()
            loop.close()

    async def _shutdown(self) -> None:
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _accept_loop(self, lsock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._take_slot()
            try:
                conn, addr = await loop.sock_accept(lsock)
            except OSError as e:  # e.g. EMFILE: keep serving the connections we have
                self.budget.give()
                log.warning("service %d: accept failed: %s", self.service_id, e)
                await asyncio.sleep(0.1)
                continue
            except BaseException:
                self.budget.give()
                raise
            conn.setblocking(False)
            task = loop.create_task(self._serve(conn, (addr[0], addr[1])))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            # In a callback, not in _serve: a task cancelled before it ran still gives back.
            task.add_done_callback(lambda _t: self.budget.give())

    async def _take_slot(self) -> None:
        """A connection from the shared budget; while there is none, do not accept."""
        if self.budget.take():
            return
        log.warning("service %d: %d proxied connections open, the limit ([lb] "
                    "proxy_max_connections): not accepting until one closes",
                    self.service_id, self.budget.limit)
        self._count(limit_waits=1)
        while not self.budget.take():
            await asyncio.sleep(ACCEPT_RETRY_S)
        log.info("service %d: accepting again", self.service_id)

    async def _serve(self, client: socket.socket, addr: tuple[str, int]) -> None:
        self._count(accepted=1, active=1)
        try:
            backend = await self._connect_backend(addr)
            if backend is None:
                self._count(backend_failures=1)
                await self._close_refused_client(client)
                return
            await self._forward(client, backend)
        except asyncio.CancelledError:
            abort(client)
            raise
        except Exception:
            log.exception("service %d: connection from %s:%d failed", self.service_id, *addr)
            abort(client)
        finally:
            self._count(active=-1, closed=1)

    async def _connect_backend(self, addr: tuple[str, int]) -> socket.socket | None:
        try:
            host, port = self.pick_backend(addr)
            family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else (
                socket.AF_INET)
        except Exception as e:
            log.warning("service %d: no backend for %s:%d: %s", self.service_id, *addr, e)
            return None
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, (host, port)),
                                   self.connect_timeout)
        except (OSError, TimeoutError) as e:
            sock.close()
            log.info("service %d: backend %s:%d failed for %s:%d: %s", self.service_id, host,
                     port, *addr, e or "timeout")
            return None
        except BaseException:
            sock.close()
            raise
        return sock

    async def _close_refused_client(self, client: socket.socket) -> None:
        """Send FIN, give the client a moment to close its side, then close.

        Closing at once with unread client bytes queued would send a RST instead of a FIN.
        What the client sent is discarded; it was never forwarded anywhere.
        """
        loop = asyncio.get_running_loop()
        try:
            client.shutdown(socket.SHUT_WR)
            async with asyncio.timeout(REFUSED_CLIENT_LINGER):
                while await loop.sock_recv(client, 65536):
                    pass
        except (OSError, TimeoutError):
            pass
        client.close()

    async def _forward(self, client: socket.socket, backend: socket.socket) -> None:
        dp = self.dataplane
        if dp is not None:
            # Baselines before the splice: nothing has been written by us yet, but an active
            # open counts its SYN in bytes_acked.
            bases = (_bytes_written(backend), _bytes_written(client))
            try:
                pair = dp.splice(self.service_id, client, backend)
            except SpliceError as e:
                log.info("service %d: relaying one connection in user space: %s",
                         self.service_id, e)
                self._count(relayed_in_userspace=1)
            else:
                await self._watch_spliced(client, backend, pair, bases)
                return
        await relay_pair(client, backend, self._relay_counters)

    # --- spliced connections ---------------------------------------------------------------

    def _on_epoll(self) -> None:
        assert self._epoll is not None
        for fd, events in self._epoll.poll(0):
            fut = self._hup_waiters.pop(fd, None)
            if fut is not None and not fut.done():
                fut.set_result(events)

    async def _wait_hup(self, sock: socket.socket) -> int:
        """Wait for FIN, RST or close on a spliced socket without reading from it."""
        assert self._epoll is not None
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._hup_waiters[sock.fileno()] = fut
        # No EPOLLIN: bytes briefly queued before the verdict runs must not wake us.
        self._epoll.register(sock.fileno(), select.EPOLLRDHUP | select.EPOLLONESHOT)
        try:
            return await fut
        finally:
            self._hup_waiters.pop(sock.fileno(), None)
            with contextlib.suppress(OSError):
                self._epoll.unregister(sock.fileno())

    async def _propagate_eof(self, src: socket.socket, dst: socket.socket,
                             dst_base: int) -> None:
        events = await self._wait_hup(src)
        if events & select.EPOLLERR or src.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
            raise ConnectionAborted("reset")
        # FIN seen. Every byte before it was handed to the verdict once the receive queue is
        # empty, but the redirect is asynchronous (the peer's psock backlog worker sends):
        # wait until the other socket has taken all of them into its send queue, or a FIN
        # would overtake them. The bare FIN itself is dropped by sp_verdict.
        # tcpi_bytes_received counts the FIN's sequence number too, hence the - 1.
        payload = _bytes_received(src) - 1
        delay = 0.0005
        while True:
            if _is_closed(dst) or (_is_closed(src) and _inq(src) > 0):
                raise ConnectionAborted("peer closed before the stream was flushed")
            if _inq(src) == 0 and _bytes_written(dst) - dst_base >= payload:
                break
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.05)
        dst.shutdown(socket.SHUT_WR)

    async def _watch_spliced(self, client: socket.socket, backend: socket.socket,
                             pair: SplicedPair, bases: tuple[int, int]) -> None:
        assert self._dataplane is not None
        tasks = [
            asyncio.ensure_future(self._propagate_eof(client, backend, bases[0])),
            asyncio.ensure_future(self._propagate_eof(backend, client, bases[1])),
        ]
        tasks.append(asyncio.ensure_future(self._cap_queued(client, backend, bases, tasks[:])))
        try:
            await finish_pair(tasks, client, backend)
        finally:
            self._dataplane.unsplice(pair)

    async def _cap_queued(self, client: socket.socket, backend: socket.socket,
                          bases: tuple[int, int], eof_tasks: list[asyncio.Future]) -> None:
        """Until both directions have ended, watch what each direction holds in the kernel
        (see _Direction.check); raise ConnectionAborted (both sides get a RST) for a peer
        that does not read."""
        dirs = [_Direction("backend", client, backend, bases[0], self.max_queued),
                _Direction("client", backend, client, bases[1], self.max_queued)]
        pending, delay = set(eof_tasks), QUEUE_CHECK_MIN_S
        while pending:
            _, pending = await asyncio.wait(pending, timeout=delay)
            if any(t.done() and (t.cancelled() or t.exception()) for t in eof_tasks):
                return  # finish_pair resets the connection already
            now = time.monotonic()
            try:
                for d in dirs:
                    if d.check(now):
                        self._count(queue_resets=1)
                        log.warning("service %d: reset a spliced connection: %d bytes queued "
                                    "for a %s that has not read them (over the limit of %d, "
                                    "[lb] proxy_max_queued_mib, for %.1f s)", self.service_id,
                                    d.queued, d.to, self.max_queued, now - d.over_since)
                        raise ConnectionAborted(f"{d.queued} bytes queued for the {d.to}")
            except OSError:
                return  # a socket went; the EOF tasks say how
            busy = any(d.clamp is not None or d.queued > self.max_queued // 16 for d in dirs)
            delay = QUEUE_CHECK_MIN_S if busy else min(delay * 2, QUEUE_CHECK_MAX_S)


@dataclass
class _Direction:
    """One direction of a spliced connection: bytes read from src and queued in the kernel
    for dst (_queued). Above max_queued/4 the source's TCP window is clamped to its minimum
    (the sender may send only about 1 KB per round trip), below max_queued/16 it is
    released: backpressure, which the splice itself lacks (a bulk upload to a backend that
    reads as fast as it can stays well under the limit, docs/perf.md). A queue that stays
    above max_queued for QUEUE_GRACE_S despite the clamp is a peer that does not read (or
    reads more slowly than a minimal window brings): check() says reset."""

    to: str  # "backend" or "client": who the bytes are for
    src: socket.socket
    dst: socket.socket
    dst_base: int
    max_queued: int
    queued: int = 0
    clamp: int | None = None  # the source's TCP_WINDOW_CLAMP before we clamped it
    over_since: float = 0.0  # when queued went above max_queued (0: it is not)

    def check(self, now: float) -> bool:
        self.queued = _queued(self.src, self.dst, self.dst_base)
        if self.queued > self.max_queued // 4:
            if self.clamp is None:
                self.clamp = self.src.getsockopt(socket.IPPROTO_TCP, socket.TCP_WINDOW_CLAMP)
            # 1: the kernel raises it to its minimum, half of SOCK_MIN_RCVBUF. Set at every
            # check: receive-buffer autotuning may have raised it since.
            self.src.setsockopt(socket.IPPROTO_TCP, socket.TCP_WINDOW_CLAMP, 1)
        elif self.clamp is not None and self.queued < self.max_queued // 16:
            self.src.setsockopt(socket.IPPROTO_TCP, socket.TCP_WINDOW_CLAMP, self.clamp)
            self.clamp = None
        if self.queued <= self.max_queued:
            self.over_since = 0.0
        elif not self.over_since:
            self.over_since = now
        return bool(self.over_since) and now - self.over_since >= QUEUE_GRACE_S
