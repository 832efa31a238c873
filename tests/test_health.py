"""Health checker against real sockets on 127.0.0.1 (ephemeral ports, no namespaces)."""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass

import pytest

from xdpfw.lb.health import (
    Backend,
    BackendStatus,
    HealthCheckConfig,
    HealthChecker,
    HealthConfigError,
    ProbeFailed,
    probe_http,
    probe_tcp,
)

LOCAL = "127.0.0.1"
FAST = {"interval_s": 0.03, "timeout_s": 0.5}
WAIT_S = 3.0


@dataclass(frozen=True)
class Event:
    service: str
    key: str
    healthy: bool
    status: BackendStatus  # the backend's status when on_change was called


class Recorder:
    def __init__(self) -> None:
        self.checker: HealthChecker | None = None
        self.events: list[Event] = []

    def __call__(self, service: str, key: str, healthy: bool) -> None:
        assert self.checker is not None
        self.events.append(Event(service, key, healthy, self.checker.status(service)[key]))

    def summary(self) -> list[tuple[str, str, bool]]:
        return [(e.service, e.key, e.healthy) for e in self.events]


def make_checker(**kwargs: object) -> tuple[HealthChecker, Recorder]:
    rec = Recorder()
    rec.checker = HealthChecker(rec, **kwargs)  # type: ignore[arg-type]
    return rec.checker, rec


async def until(predicate: Callable[[], bool], timeout: float = WAIT_S) -> bool:
    """Poll instead of sleeping a fixed time."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.01)
    return predicate()


async def tcp_server() -> asyncio.Server:
    async def handle(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    return await asyncio.start_server(handle, LOCAL, 0)


def server_port(server: asyncio.Server) -> int:
    return server.sockets[0].getsockname()[1]


@contextlib.contextmanager
def refused_port() -> Iterator[int]:
    """A port with no listener (kept bound so nobody else takes it): connects are refused."""
    with socket.socket() as s:
        s.bind((LOCAL, 0))
        yield s.getsockname()[1]


@contextlib.contextmanager
def silent_listener() -> Iterator[int]:
    """Completes handshakes (kernel backlog) but never reads or answers."""
    with socket.socket() as s:
        s.bind((LOCAL, 0))
        s.listen(8)
        yield s.getsockname()[1]


class StatusServer(http.server.ThreadingHTTPServer):
    status = 200
    daemon_threads = True


class StatusHandler(http.server.BaseHTTPRequestHandler):
    server: StatusServer

    def do_GET(self) -> None:
        self.send_response(self.server.status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def http_server() -> Iterator[StatusServer]:
    server = StatusServer((LOCAL, 0), StatusHandler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def run(coro: Awaitable[None]) -> None:
    asyncio.run(asyncio.wait_for(coro, timeout=15))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"kind": "udp"},
        {"interval_s": 0},
        {"timeout_s": -1},
        {"rise": 0},
        {"fall": 1.5},
        {"http_path": "health"},
        {"http_path": "/x HTTP/1.0\r\nX: y"},
        {"http_host": "a b"},
    ],
)
def test_bad_config_rejected(kwargs: dict[str, object]) -> None:
    with pytest.raises(HealthConfigError):
        HealthCheckConfig(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("address", "port"), [("backend.example", 80), ("127.0.0.1", 0), ("::1", 70000)]
)
def test_bad_backend_rejected(address: str, port: int) -> None:
    with pytest.raises(HealthConfigError):
        Backend("b", address, port)


def test_tcp_probe_refused_and_timeout_are_bounded() -> None:
    async def main() -> None:
        with refused_port() as port, pytest.raises(ProbeFailed, match="refused"):
            await probe_tcp(LOCAL, port, 0.5)
        with silent_listener() as port:
            start = time.monotonic()
            with pytest.raises(ProbeFailed, match=r"no answer within 0\.2s"):
                await probe_http(LOCAL, port, "/", 0.2)
            elapsed = time.monotonic() - start
            assert elapsed < 0.6, f"probe with timeout 0.2s took {elapsed:.2f}s"

    run(main())


@pytest.mark.parametrize(("status", "ok"), [(200, True), (204, True), (302, True), (404, False)])
def test_http_probe_status_classes(http_server: StatusServer, status: int, ok: bool) -> None:
    http_server.status = status
    port = http_server.server_address[1]

    async def main() -> None:
        if ok:
            await probe_http(LOCAL, port, "/healthz", 1.0)
        else:
            with pytest.raises(ProbeFailed, match=f"HTTP status {status}"):
                await probe_http(LOCAL, port, "/healthz", 1.0)

    run(main())


def test_tcp_up_after_rise_and_down_after_fall() -> None:
    config = HealthCheckConfig(kind="tcp", rise=3, fall=2, **FAST)
    checker, rec = make_checker()

    async def main() -> None:
        server = await tcp_server()
        backend = Backend("b1", LOCAL, server_port(server))
        checker.set_service("svc", config, [backend])
        async with checker:
            assert await until(lambda: len(rec.events) >= 1), (
                f"never became healthy: {checker.status('svc')}"
            )
            up = rec.events[0]
            assert (up.service, up.key, up.healthy) == ("svc", "b1", True), rec.summary()
            assert up.status.consecutive_successes == 3, f"up after {up.status}, want rise=3"
            assert up.status.probes == 3, f"up after {up.status.probes} probes, want 3"

            # Further successes are not transitions: no more calls.
            assert await until(lambda: checker.status("svc")["b1"].probes >= 6)
            assert rec.summary() == [("svc", "b1", True)], rec.summary()

            server.close()
            await server.wait_closed()
            assert await until(lambda: len(rec.events) >= 2), (
                f"never became unhealthy: {checker.status('svc')}"
            )
            down = rec.events[1]
            assert (down.key, down.healthy) == ("b1", False), rec.summary()
            assert down.status.consecutive_failures == 2, f"down after {down.status}, want 2"
            assert "refused" in (down.status.last_error or ""), down.status
        assert not checker.running
        left = [t.get_name() for t in asyncio.all_tasks() if t.get_name().startswith("health:")]
        assert left == [], f"probe tasks left after stop: {left}"

    run(main())


def test_http_200_then_500(http_server: StatusServer) -> None:
    config = HealthCheckConfig(kind="http", http_path="/healthz", rise=2, fall=2, **FAST)
    checker, rec = make_checker()
    backend = Backend("web", LOCAL, http_server.server_address[1])

    async def main() -> None:
        checker.set_service("svc", config, [backend])
        async with checker:
            assert await until(lambda: len(rec.events) >= 1), checker.status("svc")
            assert rec.events[0].healthy and rec.events[0].status.consecutive_successes == 2, (
                rec.events
            )
            http_server.status = 500
            assert await until(lambda: len(rec.events) >= 2), checker.status("svc")
            down = rec.events[1]
            assert not down.healthy and down.status.consecutive_failures == 2, rec.events
            assert "HTTP status 500" in (down.status.last_error or ""), down.status
            http_server.status = 200
            assert await until(lambda: len(rec.events) >= 3), checker.status("svc")
        assert rec.summary() == [("svc", "web", v) for v in (True, False, True)], rec.summary()

    run(main())


def test_backend_set_and_config_updated_at_run_time() -> None:
    config = HealthCheckConfig(rise=1, fall=1, **FAST)
    checker, rec = make_checker()

    async def main() -> None:
        server = await tcp_server()
        port = server_port(server)
        with refused_port() as dead:
            checker.set_service("svc", config, [Backend("a", LOCAL, port)])
            async with checker:
                assert await until(lambda: checker.healthy_backends("svc") == ["a"]), (
                    checker.status("svc")
                )
                # Replace a by b (same server) and add a dead backend c.
                checker.set_service(
                    "svc", config, [Backend("b", LOCAL, port), Backend("c", LOCAL, dead)]
                )
                assert set(checker.status("svc")) == {"b", "c"}
                assert await until(lambda: checker.healthy_backends("svc") == ["b"])
                assert await until(lambda: checker.status("svc")["c"].probes >= 2)
                assert not checker.status("svc")["c"].healthy
                # A new interval keeps the state: no transition, no call.
                calls = len(rec.events)
                slower = HealthCheckConfig(rise=1, fall=1, interval_s=0.05, timeout_s=0.5)
                checker.set_service(
                    "svc", slower, [Backend("b", LOCAL, port), Backend("c", LOCAL, dead)]
                )
                assert checker.status("svc")["b"].healthy, "config change lost b's state"
                probes = checker.status("svc")["b"].probes
                assert await until(lambda: checker.status("svc")["b"].probes >= probes + 2)
                assert len(rec.events) == calls, rec.summary()[calls:]
                checker.remove_service("svc")
                assert checker.services() == []
                left = [t for t in asyncio.all_tasks() if t.get_name().startswith("health:")]
                assert await until(lambda: all(t.done() for t in left)), f"still running: {left}"
        server.close()
        await server.wait_closed()
        assert rec.summary() == [("svc", "a", True), ("svc", "b", True)], rec.summary()

    run(main())


def test_async_and_failing_callbacks_do_not_stop_checks() -> None:
    config = HealthCheckConfig(rise=1, fall=1, **FAST)
    calls: list[bool] = []

    async def on_change(_service: str, _key: str, healthy: bool) -> None:
        await asyncio.sleep(0)
        calls.append(healthy)
        raise RuntimeError("callback bug")

    checker = HealthChecker(on_change)

    async def main() -> None:
        server = await tcp_server()
        checker.set_service("svc", config, [Backend("a", LOCAL, server_port(server))])
        async with checker:
            assert await until(lambda: calls == [True]), calls
            server.close()
            await server.wait_closed()
            assert await until(lambda: calls == [True, False]), calls

    run(main())


def test_stop_is_idempotent_and_restart_keeps_state() -> None:
    config = HealthCheckConfig(rise=1, fall=3, **FAST)
    checker, rec = make_checker()

    async def main() -> None:
        server = await tcp_server()
        checker.set_service("svc", config, [Backend("a", LOCAL, server_port(server))])
        await checker.stop()  # not started: no-op
        await checker.start()
        await checker.start()  # already started: no duplicate probes
        assert await until(lambda: checker.healthy_backends("svc") == ["a"])
        await checker.stop()
        await checker.stop()
        probes = checker.status("svc")["a"].probes
        await asyncio.sleep(3 * config.interval_s)
        assert checker.status("svc")["a"].probes == probes, "probing continued after stop"
        await checker.start()
        assert await until(lambda: checker.status("svc")["a"].probes > probes)
        assert checker.status("svc")["a"].healthy, "restart lost the state"
        await checker.stop()
        server.close()
        await server.wait_closed()
        assert rec.summary() == [("svc", "a", True)], rec.summary()

    run(main())


def test_running_checker_refuses_calls_from_another_thread() -> None:
    checker, _ = make_checker()
    errors: list[BaseException] = []

    def other_thread() -> None:
        try:
            checker.remove_service("svc")
        except RuntimeError as e:
            errors.append(e)

    async def main() -> None:
        async with checker:
            thread = threading.Thread(target=other_thread)
            thread.start()
            await asyncio.to_thread(thread.join, 5)
        assert len(errors) == 1 and "event loop" in str(errors[0]), errors

    run(main())
