"""Active health checks of load-balancer backends, with rise/fall hysteresis.

One asyncio task per backend probes it every `interval_s` (a TCP connect, or an HTTP GET that
must answer 2xx/3xx) and counts consecutive results: a down backend comes up after `rise`
successes in a row, an up backend goes down after `fall` failures in a row. `on_change` is
called only on those transitions, so the caller can rebuild the Maglev table exactly when the
healthy set changes.

Probes are plain sockets from the current process and namespace: the appliance sits on the
backends' network, so nothing here enters a namespace.

All methods must be called from the thread running the event loop (from another thread,
use `loop.call_soon_threadsafe`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import ipaddress
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal

from xdpfw.errors import ServiceValidationError

log = logging.getLogger(__name__)

HealthKind = Literal["tcp", "http"]
OnChange = Callable[[str, str, bool], Awaitable[None] | None]

# Status lines longer than this are not HTTP: stop reading rather than buffer a stream.
_MAX_STATUS_LINE = 1024


class HealthConfigError(ServiceValidationError):
    """A health-check configuration or backend that cannot be probed."""


class ProbeFailed(Exception):
    """One probe failed; `reason` says why in words a person can act on."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class HealthCheckConfig:
    kind: HealthKind = "tcp"
    interval_s: float = 2.0
    timeout_s: float = 1.0
    rise: int = 2
    fall: int = 3
    http_path: str = "/"
    # Host header for HTTP checks; None sends the backend's address.
    http_host: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("tcp", "http"):
            raise HealthConfigError(f"kind must be 'tcp' or 'http', got {self.kind!r}")
        if not self.interval_s > 0:
            raise HealthConfigError(f"interval_s must be > 0, got {self.interval_s!r}")
        if not self.timeout_s > 0:
            raise HealthConfigError(f"timeout_s must be > 0, got {self.timeout_s!r}")
        for name in ("rise", "fall"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise HealthConfigError(f"{name} must be an integer >= 1, got {value!r}")
        # The path and host go verbatim into the request: no whitespace, so no header injection.
        if not self.http_path.startswith("/") or any(c.isspace() for c in self.http_path):
            raise HealthConfigError(
                f"http_path must start with '/' and contain no whitespace: {self.http_path!r}"
            )
        if self.http_host is not None and (
            not self.http_host or any(c.isspace() for c in self.http_host)
        ):
            raise HealthConfigError(
                f"http_host must be non-empty, no whitespace: {self.http_host!r}"
            )


@dataclass(frozen=True)
class Backend:
    """A backend to probe; `key` is its identity (the same key the Maglev table uses)."""

    key: str
    address: str
    port: int

    def __post_init__(self) -> None:
        try:
            ipaddress.ip_address(self.address)
        except ValueError as e:
            raise HealthConfigError(f"backend {self.key!r}: {e}") from e
        if isinstance(self.port, bool) or not isinstance(self.port, int):
            raise HealthConfigError(f"backend {self.key!r}: port must be an int: {self.port!r}")
        if not 0 < self.port < 65536:
            raise HealthConfigError(f"backend {self.key!r}: port {self.port} out of 1..65535")


@dataclass(frozen=True)
class BackendStatus:
    healthy: bool
    consecutive_successes: int
    consecutive_failures: int
    probes: int
    last_error: str | None
    # time.monotonic() of the last completed probe, None before the first.
    last_probe: float | None


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()


def _describe(e: OSError) -> str:
    # asyncio puts "Connect call failed (addr)" in strerror: the errno's text says more.
    return os.strerror(e.errno) if e.errno else str(e) or type(e).__name__


async def probe_tcp(address: str, port: int, timeout_s: float) -> None:
    """Succeeds if a TCP connection is established within timeout_s; raises ProbeFailed."""
    try:
        async with asyncio.timeout(timeout_s):
            _, writer = await asyncio.open_connection(address, port)
            await _close(writer)
    except TimeoutError:
        raise ProbeFailed(f"tcp {address} port {port}: no answer within {timeout_s}s") from None
    except OSError as e:
        raise ProbeFailed(f"tcp {address} port {port}: {_describe(e)}") from e


def _host_header(address: str, port: int) -> str:
    host = f"[{address}]" if ":" in address else address
    return host if port == 80 else f"{host}:{port}"


async def probe_http(
    address: str, port: int, path: str, timeout_s: float, host: str | None = None
) -> None:
    """Succeeds on a 2xx/3xx status line within timeout_s; raises ProbeFailed."""
    what = f"http {address} port {port} GET {path}"
    request = (
        f"GET {path} HTTP/1.1\r\nHost: {host or _host_header(address, port)}\r\n"
        "User-Agent: xdpfw-health\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    ).encode("ascii")
    try:
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection(address, port, limit=_MAX_STATUS_LINE)
            try:
                writer.write(request)
                await writer.drain()
                line = await reader.readline()
            finally:
                await _close(writer)
    except TimeoutError:
        raise ProbeFailed(f"{what}: no answer within {timeout_s}s") from None
    except ValueError as e:  # StreamReader's limit overrun
        raise ProbeFailed(f"{what}: status line longer than {_MAX_STATUS_LINE} bytes") from e
    except OSError as e:
        raise ProbeFailed(f"{what}: {_describe(e)}") from e
    parts = line.split(maxsplit=2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
        shown = line[:80].decode("latin-1") if line else "connection closed"
        raise ProbeFailed(f"{what}: not an HTTP status line: {shown!r}")
    status = int(parts[1])
    if not 200 <= status < 400:
        raise ProbeFailed(f"{what}: HTTP status {status}")


async def probe(backend: Backend, config: HealthCheckConfig) -> None:
    if config.kind == "http":
        await probe_http(
            backend.address, backend.port, config.http_path, config.timeout_s, config.http_host
        )
    else:
        await probe_tcp(backend.address, backend.port, config.timeout_s)


@dataclass
class _Tracked:
    backend: Backend
    status: BackendStatus
    task: asyncio.Task[None] | None = None


@dataclass
class _Service:
    config: HealthCheckConfig
    backends: dict[str, _Tracked] = field(default_factory=dict)


class HealthChecker:
    """Probes the backends of every service and reports health transitions to `on_change`.

    `on_change(service_id, backend_key, healthy)` may be a plain function or a coroutine
    function; its exceptions are logged and do not stop the checks. Backends start in
    `initial_healthy` state (default: down, so no traffic goes to a backend that has not yet
    passed `rise` probes) and no call is made for that initial state.
    """

    def __init__(self, on_change: OnChange, *, initial_healthy: bool = False) -> None:
        self._on_change = on_change
        self._initial = BackendStatus(initial_healthy, 0, 0, 0, None, None)
        self._services: dict[str, _Service] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def running(self) -> bool:
        return self._loop is not None

    async def start(self) -> None:
        """Start probing every known backend (first probes at once)."""
        if self._loop is not None:
            return
        self._loop = asyncio.get_running_loop()
        for service_id, service in self._services.items():
            for tracked in service.backends.values():
                self._spawn(service_id, tracked)

    async def stop(self) -> None:
        """Cancel every probe and wait for them to finish; idempotent. State is kept."""
        if self._loop is None:
            return
        tasks = [
            t.task
            for s in self._services.values()
            for t in s.backends.values()
            if t.task is not None
        ]
        for service in self._services.values():
            for tracked in service.backends.values():
                tracked.task = None
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._loop = None

    async def __aenter__(self) -> HealthChecker:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def set_service(
        self, service_id: str, config: HealthCheckConfig, backends: Iterable[Backend]
    ) -> None:
        """Add a service or replace its config and backend set.

        A backend whose key, address and port are unchanged keeps its state and counters (only
        its probe restarts if the config changed). A new key, or a key whose address or port
        changed, starts afresh in the initial state. Neither adding nor removing a backend
        calls on_change: the caller made that change and knows it.
        """
        self._check_thread()
        wanted: dict[str, Backend] = {}
        for b in backends:
            if b.key in wanted:
                raise HealthConfigError(f"service {service_id!r}: duplicate backend {b.key!r}")
            wanted[b.key] = b
        service = self._services.get(service_id)
        if service is None:
            service = self._services[service_id] = _Service(config)
        config_changed = service.config != config
        service.config = config
        for key in list(service.backends):
            if key not in wanted:
                self._cancel(service.backends.pop(key))
        for key, backend in wanted.items():
            tracked = service.backends.get(key)
            if tracked is not None and tracked.backend == backend:
                if config_changed:
                    self._cancel(tracked)
                    self._spawn(service_id, tracked)
                continue
            if tracked is not None:
                self._cancel(tracked)
            tracked = service.backends[key] = _Tracked(backend, self._initial)
            self._spawn(service_id, tracked)

    def remove_service(self, service_id: str) -> None:
        """Stop probing a service's backends; unknown ids are ignored. No on_change calls."""
        self._check_thread()
        service = self._services.pop(service_id, None)
        if service is not None:
            for tracked in service.backends.values():
                self._cancel(tracked)

    def services(self) -> list[str]:
        return list(self._services)

    def status(self, service_id: str) -> dict[str, BackendStatus]:
        """Each backend's current status; KeyError for an unknown service."""
        return {k: t.status for k, t in self._services[service_id].backends.items()}

    def healthy_backends(self, service_id: str) -> list[str]:
        return [k for k, s in self.status(service_id).items() if s.healthy]

    def _check_thread(self) -> None:
        if self._loop is None:
            return
        try:
            current = asyncio.get_running_loop()
        except RuntimeError:
            current = None
        if current is not self._loop:
            raise RuntimeError(
                "HealthChecker is running: call it from its event loop thread "
                "(e.g. loop.call_soon_threadsafe)"
            )

    def _spawn(self, service_id: str, tracked: _Tracked) -> None:
        if self._loop is None:
            return
        tracked.task = self._loop.create_task(
            self._probe_loop(service_id, tracked),
            name=f"health:{service_id}:{tracked.backend.key}",
        )

    @staticmethod
    def _cancel(tracked: _Tracked) -> None:
        if tracked.task is not None:
            tracked.task.cancel()
            tracked.task = None

    async def _probe_loop(self, service_id: str, tracked: _Tracked) -> None:
        loop = asyncio.get_running_loop()
        while True:
            config = self._services[service_id].config
            started = loop.time()
            try:
                await probe(tracked.backend, config)
                error = None
            except ProbeFailed as e:
                error = e.reason
            except Exception as e:  # a bug in a probe must not silently stop the checks
                log.exception("health probe of %s/%s crashed", service_id, tracked.backend.key)
                error = f"probe crashed: {e!r}"
            await self._record(service_id, tracked, config, error)
            await asyncio.sleep(max(0.0, config.interval_s - (loop.time() - started)))

    async def _record(
        self, service_id: str, tracked: _Tracked, config: HealthCheckConfig, error: str | None
    ) -> None:
        s = tracked.status
        ok = error is None
        successes = s.consecutive_successes + 1 if ok else 0
        failures = 0 if ok else s.consecutive_failures + 1
        healthy = s.healthy
        if not healthy and successes >= config.rise:
            healthy = True
        elif healthy and failures >= config.fall:
            healthy = False
        tracked.status = dataclasses.replace(
            s,
            healthy=healthy,
            consecutive_successes=successes,
            consecutive_failures=failures,
            probes=s.probes + 1,
            last_error=error if error is not None else s.last_error,
            last_probe=time.monotonic(),
        )
        if healthy != s.healthy:
            log.info(
                "backend %s/%s is now %s%s",
                service_id,
                tracked.backend.key,
                "up" if healthy else "down",
                f" ({error})" if error else "",
            )
            await self._notify(service_id, tracked.backend.key, healthy)

    async def _notify(self, service_id: str, key: str, healthy: bool) -> None:
        try:
            result = self._on_change(service_id, key, healthy)
            if inspect.isawaitable(result):
                await result
        except Exception:  # the caller's bug must not stop health checking
            log.exception("on_change(%r, %r, %r) failed", service_id, key, healthy)
