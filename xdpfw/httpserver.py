"""How `xdpfw serve` runs uvicorn: the unix socket and the TCP listeners are two servers.

- The unix socket (local, no token) runs on the main thread's event loop. Its protocol puts
  the peer's credentials (SO_PEERCRED) into each request's scope (xdpfw.api.peer).
- TCP runs on an event loop of its own, in a thread, so a flood of TCP connections never
  delays the local socket's loop. Its protocol enforces, before any authentication:
  - a cap on open connections, and a lower one on those of one client address (an IPv6
    /64, xdpfw.clients): a connection over either is closed at once, unread, so it takes
    several addresses, not one, to keep token holders from connecting;
  - a header deadline: a request's headers (the first, and each one after a response) must
    be complete within `header_timeout_s`, however slowly they trickle in;
  - an idle timeout: while the server waits for the client (headers or body), a client that
    sends nothing for `idle_timeout_s` is cut off. A request being answered (a long bulk
    load, an event stream) is not idle.

Both subclass uvicorn's h11 protocol (uvicorn 0.54, h11_impl.H11Protocol): the hooks used are
connection_made/lost, data_received, handle_events, on_response_complete, and the `cycle`,
`flow` and `app_state` attributes. tests/test_httpserver.py exercises each of them.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import uvicorn
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from uvicorn.protocols.http.h11_impl import H11Protocol

from xdpfw.api.peer import STATE_KEY, Peer
from xdpfw.clients import ClientCounts, RefusalLog, client_key

log = logging.getLogger(__name__)

_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
GRACEFUL_SHUTDOWN_S = 5  # open event streams never end on their own


class UnixProtocol(H11Protocol):
    """Requests on this connection carry the peer's pid/uid/gid in scope["state"]."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        sock = transport.get_extra_info("socket")
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
        except (OSError, AttributeError):  # no credentials: treated as a remote client
            pass
        else:
            # uvicorn copies app_state into every request's scope["state"].
            self.app_state = {**self.app_state, STATE_KEY: Peer(*_UCRED.unpack(raw))}
        super().connection_made(transport)


@dataclass(frozen=True)
class TcpLimits:
    max_connections: int = 256
    header_timeout_s: float = 10.0
    idle_timeout_s: float = 30.0
    max_per_client: int = 64  # 0: no cap


@dataclass
class ConnectionGuard:
    """Shared by the protocols of one TCP server (one event loop: no lock needed)."""

    limits: TcpLimits
    open: int = 0
    refused: int = 0  # closed unread because the cap was reached
    refused_client: int = 0  # closed unread because the client's cap was reached
    timed_out: int = 0  # closed by the header deadline or the idle timeout
    _full: bool = field(default=False, repr=False)
    clients: ClientCounts = field(init=False, repr=False)
    _refusals: RefusalLog = field(default_factory=RefusalLog, init=False, repr=False)

    def __post_init__(self) -> None:
        self.clients = ClientCounts(self.limits.max_per_client)

    def admit(self, client: str) -> bool:
        """client: its client_key. On True, release(client) when the connection ends."""
        if self.open >= self.limits.max_connections:
            self.refused += 1
            if not self._full:
                self._full = True
                log.warning("TCP API at its connection limit (%d): new connections are "
                            "closed unread", self.limits.max_connections)
            return False
        if not self.clients.take(client):
            self.refused_client += 1
            if n := self._refusals.refused():
                log.warning("TCP API: closed %d connection(s) unread: client %s already "
                            "holds [api] max_connections_per_client (%d)", n, client,
                            self.limits.max_per_client)
            return False
        self.open += 1
        if self._full and self.open < self.limits.max_connections:
            self._full = False
            log.warning("TCP API below its connection limit again (%d refused so far)",
                        self.refused)
        return True

    def release(self, client: str) -> None:
        self.open -= 1
        self.clients.give(client)


class GuardedProtocol(H11Protocol):
    """The TCP side: see the module docstring. `guard` is set by guarded_protocol()."""

    guard: ConnectionGuard

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._admitted = False
        self._deadline: asyncio.TimerHandle | None = None
        self._idle: asyncio.TimerHandle | None = None
        self._last_rx = 0.0
        self._awaited = None  # the cycle current when the header deadline was armed
        self._client = ""  # its client_key, once connected

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._client = peer_key(transport)
        if not self.guard.admit(self._client):
            transport.abort()  # frees the descriptor now; nothing was read
            return
        self._admitted = True
        super().connection_made(transport)
        self._last_rx = self.loop.time()
        self._await_headers()
        self._idle = self.loop.call_later(self.guard.limits.idle_timeout_s, self._check_idle)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._admitted:
            return
        self._admitted = False
        self.guard.release(self._client)
        for timer in (self._deadline, self._idle):
            if timer is not None:
                timer.cancel()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._last_rx = self.loop.time()
        super().data_received(data)

    def handle_events(self) -> None:
        super().handle_events()
        if self._deadline is not None and self.cycle is not self._awaited:
            self._deadline.cancel()  # a new request's headers are in
            self._deadline = None

    def on_response_complete(self) -> None:
        answered = self.cycle
        super().on_response_complete()  # may start a pipelined request
        if self._admitted and not self.transport.is_closing() and self.cycle is answered:
            self._await_headers()

    def _await_headers(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._awaited = self.cycle
        self._deadline = self.loop.call_later(self.guard.limits.header_timeout_s, self._cut)

    def _waiting_for_client(self) -> bool:
        cycle = self.cycle
        if cycle is None or cycle.response_complete:
            return True  # for a request's headers
        # Reading the body, unless we paused reading ourselves (the app is behind).
        return cycle.more_body and not self.flow.read_paused

    def _check_idle(self) -> None:
        if not self._admitted:
            return
        limit = self.guard.limits.idle_timeout_s
        quiet = self.loop.time() - self._last_rx
        if quiet >= limit and self._waiting_for_client():
            self._cut()
            return
        self._idle = self.loop.call_later(max(limit - quiet, 0.05), self._check_idle)

    def _cut(self) -> None:
        if self._admitted and not self.transport.is_closing():
            self.guard.timed_out += 1
            self.transport.abort()


def peer_key(transport: asyncio.BaseTransport) -> str:
    """The client_key of a TCP connection's peer ("" if the kernel gives none)."""
    peer = transport.get_extra_info("peername")
    try:
        return client_key(peer[0])
    except (TypeError, IndexError, ValueError):
        return ""


def guarded_protocol(guard: ConnectionGuard) -> type[GuardedProtocol]:
    return type("GuardedProtocol", (GuardedProtocol,), {"guard": guard})


class GuardCollector(Collector):
    """The TCP listeners' pre-auth limits at work, for Prometheus (read at scrape time; each
    guard's counters are written by its own loop's thread, ints read whole)."""

    def __init__(self, guards: dict[str, ConnectionGuard]) -> None:
        self.guards = guards

    def collect(self) -> Iterator[Metric]:
        open_ = GaugeMetricFamily("xdpfw_tcp_connections_open",
                                  "TCP connections open, by listener", labels=["listener"])
        refused = CounterMetricFamily(
            "xdpfw_tcp_connections_refused", "TCP connections closed unread at accept, by "
            "listener and the cap reached (limit: max_connections; client_limit: "
            "max_connections_per_client)", labels=["listener", "reason"])
        timed_out = CounterMetricFamily(
            "xdpfw_tcp_connections_timed_out", "TCP connections cut by the header deadline or "
            "the idle timeout, by listener", labels=["listener"])
        for name, g in self.guards.items():
            open_.add_metric([name], g.open)
            refused.add_metric([name, "limit"], g.refused)
            refused.add_metric([name, "client_limit"], g.refused_client)
            timed_out.add_metric([name], g.timed_out)
        yield from (open_, refused, timed_out)


class Server(uvicorn.Server):
    """uvicorn's server, calling `before_shutdown` first when it stops (however it was told
    to: a signal, or should_exit), so that endless responses (event streams) can end."""

    def __init__(self, config: uvicorn.Config, before_shutdown: list[Callable[[], None]]):
        super().__init__(config)
        self.before_shutdown = before_shutdown

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for hook in self.before_shutdown:
            hook()
        await super().shutdown(sockets)


def _config(app, protocol: type[H11Protocol], log_level: str) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        http=protocol,
        ws="none",
        lifespan="off",
        access_log=False,
        log_config=None,  # records go to the root logger, and through its rate limit
        log_level=log_level,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
    )


class ApiServers:
    """run() serves until stop(); the TCP server (if any) runs in a thread of its own."""

    def __init__(
        self,
        app,
        unix_socket: socket.socket,
        tcp_sockets: list[socket.socket],
        limits: TcpLimits,
        log_level: str = "info",
        metrics_app=None,
        metrics_sockets: list[socket.socket] | None = None,
    ) -> None:
        """metrics_app: served on metrics_sockets (the read-only [metrics] listener), on an
        event loop of its own, with the same pre-auth limits as the API's TCP side."""
        self.guard = ConnectionGuard(limits)
        self.guards: dict[str, ConnectionGuard] = {}  # by listener, those serving (metrics)
        self.before_shutdown: list[Callable[[], None]] = []
        self.unix = Server(_config(app, UnixProtocol, log_level), self.before_shutdown)
        # (name, server, sockets) served in threads of their own
        self._threaded: list[tuple[str, Server, list[socket.socket]]] = []
        self.tcp = None
        if tcp_sockets:
            self.tcp = Server(_config(app, guarded_protocol(self.guard), log_level),
                              self.before_shutdown)
            self._threaded.append(("TCP API", self.tcp, tcp_sockets))
            self.guards["api"] = self.guard
        if metrics_app is not None and metrics_sockets:
            self.guards["metrics"] = ConnectionGuard(limits)
            protocol = guarded_protocol(self.guards["metrics"])
            server = Server(_config(metrics_app, protocol, log_level), [])
            self._threaded.append(("metrics listener", server, metrics_sockets))
        self._unix_socket = unix_socket
        self.tcp_failed: BaseException | None = None

    def run(self) -> None:
        threads = []
        for name, server, sockets in self._threaded:
            t = threading.Thread(target=self._run_threaded, args=(name, server, sockets),
                                 name=f"xdpfw-{name.replace(' ', '-').lower()}", daemon=True)
            t.start()
            threads.append(t)
        try:
            self.unix.run(sockets=[self._unix_socket])
        finally:
            self.stop()
            for t in threads:
                t.join(GRACEFUL_SHUTDOWN_S + 5)
        if self.tcp_failed is not None:
            raise RuntimeError(f"the {self.tcp_failed}") from self.tcp_failed

    def stop(self) -> None:
        self.unix.should_exit = True
        for _, server, _ in self._threaded:
            server.should_exit = True

    def _run_threaded(self, name: str, server: Server, sockets: list[socket.socket]) -> None:
        failed: BaseException | None = None
        try:
            server.run(sockets=sockets)
        except BaseException as e:  # uvicorn exits on a start-up failure
            failed = e
        if not self.unix.should_exit:  # a daemon serving half its API would only confuse
            failed = failed or RuntimeError("it returned")
            log.error("the %s stopped unexpectedly (%s): stopping", name, failed)
            self.unix.should_exit = True
        if failed is not None:
            self.tcp_failed = RuntimeError(f"{name} stopped: {failed}")
