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

What an engine may hold, connections and bytes queued in the kernel for a peer that does
not read, is limits.py's: one Budgets shared by every engine of a daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import select
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from xdpfw.clients import RefusalLog, client_key
from xdpfw.errors import ConflictError, ServiceValidationError, XdpfwError
from xdpfw.netns import thread_in_netns
from xdpfw.proxy import tcpinfo
from xdpfw.proxy.abi import SP_MAX_SOCKETS
from xdpfw.proxy.fallback import RequestedMode, load_or_fall_back
from xdpfw.proxy.limits import (
    QUEUE_CHECK_MAX_S,
    QUEUE_CHECK_MIN_S,
    Budgets,
    Direction,
    PairWatch,
)
from xdpfw.proxy.loader import (
    SPLICE_SNDBUF,
    ConnCounters,
    SockProxyDataplane,
    SplicedPair,
    SpliceError,
    TrafficCounters,
)
from xdpfw.proxy.relay import (
    ConnectionAborted,
    RelayCounters,
    abort,
    finish_pair,
    relay_pair,
    watch_pair,
)

log = logging.getLogger("xdpfw.proxy")

Mode = Literal["sockhash", "userspace"]
PickBackend = Callable[[tuple[str, int]], tuple[str, int]]

# How long a client refused by every backend gets to read our FIN and close first.
REFUSED_CLIENT_LINGER = 2.0
ACCEPT_RETRY_S = 0.05  # while the connection budget is spent


class EngineError(XdpfwError):
    """The engine was used out of order (not started, started twice)."""


class ListenError(EngineError, ServiceValidationError):
    """The engine cannot listen on its address (not an address of this host, ...)."""


class AddressInUseError(ConflictError, ListenError):
    """Something else listens on the engine's address already (ConflictError first: its
    HTTP status is ConflictError's)."""


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
        budgets: Budgets | None = None,
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
        self.budgets = budgets or Budgets()
        self._dataplane = dataplane
        self._owns_dataplane = False
        self._mode: Mode | None = None
        self.fallback_reason: str | None = None
        self._relay_counters = RelayCounters()
        self._local_conns = _LocalConns()
        self._refusals = RefusalLog()
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
        self.budgets.connections.register(self.service_id)
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
        self.budgets.connections.unregister(self.service_id)
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
                self.budgets.connections.give(self.service_id)
                log.warning("service %d: accept failed: %s", self.service_id, e)
                await asyncio.sleep(0.1)
                continue
            except BaseException:
                self.budgets.connections.give(self.service_id)
                raise
            key = client_key(addr[0])
            if not self.budgets.clients.take(key):
                abort(conn)
                self.budgets.connections.give(self.service_id)
                self._refused_client(key)
                continue
            conn.setblocking(False)
            task = loop.create_task(self._serve(conn, (addr[0], addr[1])))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            # In a callback, not in _serve: a task cancelled before it ran still gives back.
            task.add_done_callback(lambda _t, key=key: self._give_back(key))

    def _give_back(self, key: str) -> None:
        self.budgets.clients.give(key)
        self.budgets.connections.give(self.service_id)

    def _refused_client(self, key: str) -> None:
        """Count a connection reset at accept for its client's cap (and log, RefusalLog)."""
        self._count(client_refusals=1)
        if n := self._refusals.refused():
            log.warning("service %d: reset %d connection(s) at accept: client %s already "
                        "holds [lb] proxy_max_connections_per_client (%d) proxied connections",
                        self.service_id, n, key, self.budgets.clients.cap)

    async def _take_slot(self) -> None:
        """A connection from the shared budget; while there is none, do not accept."""
        if self.budgets.connections.take(self.service_id):
            return
        log.warning("service %d: no proxied connection free for it ([lb] "
                    "proxy_max_connections: %d over all proxy services, the last quarter kept "
                    "for services under their share): not accepting until one closes",
                    self.service_id, self.budgets.connections.limit)
        self._count(limit_waits=1)
        while not self.budgets.connections.take(self.service_id):
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
            bases = (tcpinfo.bytes_written(backend), tcpinfo.bytes_written(client))
            try:
                pair = dp.splice(self.service_id, client, backend)
            except SpliceError as e:
                log.info("service %d: relaying one connection in user space: %s",
                         self.service_id, e)
                self._count(relayed_in_userspace=1)
            else:
                await self._watch_spliced(client, backend, pair, bases)
                return
        await relay_pair(client, backend, self._relay_counters,
                         watch=lambda tasks: self._watch(client, backend, tasks, []))

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
        payload = tcpinfo.bytes_received(src) - 1
        delay = 0.0005
        while True:
            if tcpinfo.is_closed(dst) or (tcpinfo.is_closed(src) and tcpinfo.inq(src) > 0):
                raise ConnectionAborted("peer closed before the stream was flushed")
            if tcpinfo.inq(src) == 0 and tcpinfo.bytes_written(dst) - dst_base >= payload:
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
        limits, budget = self.budgets.limits, self.budgets.queued
        dirs = [Direction("backend", client, backend, bases[0], limits, budget),
                Direction("client", backend, client, bases[1], limits, budget)]
        tasks.append(asyncio.ensure_future(self._watch(client, backend, tasks[:], dirs)))
        try:
            await finish_pair(tasks, client, backend)
        finally:
            self._dataplane.unsplice(pair)

    async def _watch(self, client: socket.socket, backend: socket.socket,
                     tasks: list[asyncio.Future], dirs: list[Direction]) -> None:
        """Beside a connection's two directions: hold it to the limits (limits.PairWatch);
        raise ConnectionAborted (both sides get a RST) to end it."""
        watch = PairWatch(client, backend, self.budgets.limits, dirs, time.monotonic())

        def check(now: float) -> bool:
            reset, busy = watch.check(now)
            if reset is not None:
                self._count(**{reset.counter: 1})
                log.warning("service %d: reset a proxied connection: %s", self.service_id,
                            reset.why)
                raise ConnectionAborted(reset.why)
            return busy

        try:
            await watch_pair(tasks, check, fast=QUEUE_CHECK_MIN_S, slow=QUEUE_CHECK_MAX_S)
        finally:
            watch.release()
