"""xdpfw.httpserver on a real uvicorn (no BPF): the TCP limits that apply before any token is
read, and the unix socket's peer credentials."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import threading
import time

import pytest
from prometheus_client import CollectorRegistry

from xdpfw.api.peer import peer_of
from xdpfw.httpserver import ApiServers, GuardCollector, TcpLimits


async def app(scope, receive, send):
    """/slow answers after 1.5 s; /body reads the body; /peer tells who asked."""
    if scope["type"] != "http":
        return
    path = scope["path"]
    if path == "/slow":
        await asyncio.sleep(1.5)
    size = 0
    if path == "/body":
        while True:
            message = await receive()
            size += len(message.get("body", b""))
            if not message.get("more_body"):
                break
    peer = peer_of(scope)
    body = json.dumps({"size": size, "peer": peer and [peer.pid, peer.uid]}).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class Running:
    def __init__(self, tmp_path, limits: TcpLimits) -> None:
        self.path = str(tmp_path / "api.sock")
        unix = socket.socket(socket.AF_UNIX)
        unix.bind(self.path)
        tcp = socket.socket()
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        tcp.bind(("127.0.0.1", 0))
        self.port = tcp.getsockname()[1]
        self.servers = ApiServers(app, unix, [tcp], limits, log_level="warning")
        self.thread = threading.Thread(target=self.servers.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not (self.servers.unix.started and self.servers.tcp.started):
            assert time.monotonic() < deadline, "the servers did not start"
            time.sleep(0.02)

    def tcp(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=5)

    def unix(self) -> socket.socket:
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(5)
        s.connect(self.path)
        return s

    def stop(self) -> None:
        self.servers.stop()
        self.thread.join(15)
        assert not self.thread.is_alive(), "the servers did not stop"


@pytest.fixture
def serve(tmp_path):
    running: list[Running] = []

    def start(**limits) -> Running:
        running.append(Running(tmp_path, TcpLimits(**limits)))
        return running[-1]

    yield start
    for r in running:
        r.stop()


def request(sock: socket.socket, path: str = "/") -> dict:
    sock.sendall(f"GET {path} HTTP/1.1\r\nhost: x\r\n\r\n".encode())
    return response(sock)


def response(sock: socket.socket) -> dict:
    data = b""
    while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
        chunk = sock.recv(65536)
        assert chunk, f"closed after {data!r}"
        data += chunk
    assert data.startswith(b"HTTP/1.1 200"), data
    return json.loads(data.split(b"\r\n\r\n", 1)[1])


def closed_within(sock: socket.socket, seconds: float) -> float:
    """Seconds until the server closed `sock` (reading whatever it sent); fails after
    `seconds`."""
    start = time.monotonic()
    sock.settimeout(seconds)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    except TimeoutError:
        pytest.fail(f"still open after {seconds}s")
    return time.monotonic() - start


def test_connections_over_the_cap_are_closed_at_once(serve):
    s = serve(max_connections=5, header_timeout_s=30, idle_timeout_s=30)
    held = [s.tcp() for _ in range(5)]
    time.sleep(0.2)  # the server has accepted them
    extra = s.tcp()
    assert closed_within(extra, 2) < 1, "a connection over the cap was kept"
    assert s.servers.guard.refused >= 1 and s.servers.guard.open == 5
    assert request(s.unix(), "/peer")["peer"], "the unix socket stopped answering"
    held[0].close()
    time.sleep(0.2)
    with s.tcp() as again:
        assert request(again) == {"size": 0, "peer": None}
    for h in held[1:]:
        h.close()


def test_a_client_address_over_its_cap_is_closed_and_others_still_connect(serve):
    s = serve(max_connections=10, max_per_client=3, header_timeout_s=30, idle_timeout_s=30)
    held = [s.tcp() for _ in range(3)]
    time.sleep(0.2)  # the server has accepted them
    extra = s.tcp()
    assert closed_within(extra, 2) < 1, "a 4th connection from one address was kept"
    guard = s.servers.guard
    assert (guard.refused_client, guard.refused, guard.open) == (1, 0, 3)
    # Another address (loopback answers any 127/8 source) is served meanwhile.
    with socket.create_connection(("127.0.0.1", s.port), timeout=5,
                                  source_address=("127.0.0.2", 0)) as other:
        assert request(other) == {"size": 0, "peer": None}
    held[0].close()
    time.sleep(0.2)
    with s.tcp() as again:  # the first address once it holds fewer
        assert request(again) == {"size": 0, "peer": None}
    registry = CollectorRegistry()
    registry.register(GuardCollector(s.servers.guards))
    value = registry.get_sample_value
    assert value("xdpfw_tcp_connections_refused_total",
                 {"listener": "api", "reason": "client_limit"}) == 1
    assert value("xdpfw_tcp_connections_refused_total",
                 {"listener": "api", "reason": "limit"}) == 0
    deadline = time.monotonic() + 2  # the server sees `again` close
    while value("xdpfw_tcp_connections_open", {"listener": "api"}) != 2:
        assert time.monotonic() < deadline, guard
        time.sleep(0.02)
    for h in held[1:]:
        h.close()
    time.sleep(0.2)
    assert guard.open == 0 and not guard.clients._held, guard.clients._held


def test_headers_must_arrive_in_time_however_slowly_they_trickle(serve):
    s = serve(header_timeout_s=0.5, idle_timeout_s=30)
    sock = s.tcp()
    sock.sendall(b"GET / HTTP/1.1\r\n")

    def trickle():
        with contextlib.suppress(OSError):
            for _ in range(30):
                sock.send(b"x")
                time.sleep(0.1)

    threading.Thread(target=trickle, daemon=True).start()
    assert closed_within(sock, 3) < 1.5
    assert s.servers.guard.timed_out == 1


def test_the_next_request_on_a_kept_connection_has_a_deadline_too(serve):
    s = serve(header_timeout_s=0.5, idle_timeout_s=30)
    with s.tcp() as sock:
        request(sock)
        sock.sendall(b"GET / HTTP/1.1\r\n")  # and nothing more
        assert closed_within(sock, 3) < 1.5


def test_a_client_silent_in_the_middle_of_its_body_is_cut_off(serve):
    s = serve(header_timeout_s=30, idle_timeout_s=0.5)
    with s.tcp() as sock:
        sock.sendall(b"POST /body HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n0123456789")
        assert closed_within(sock, 3) < 1.5


def test_a_request_being_answered_is_not_idle(serve):
    """The client sends nothing while /slow works for 1.5 s: three idle timeouts."""
    s = serve(header_timeout_s=0.5, idle_timeout_s=0.5)
    with s.tcp() as sock:
        assert request(sock, "/slow") == {"size": 0, "peer": None}
        body = b"x" * 300_000
        sock.sendall(b"POST /body HTTP/1.1\r\nhost: x\r\ncontent-length: 300000\r\n\r\n" + body)
        assert response(sock)["size"] == 300_000


def test_the_unix_socket_reports_the_peer(serve):
    s = serve()
    with s.unix() as sock:
        assert request(sock, "/peer")["peer"] == [os.getpid(), os.getuid()]
    with s.tcp() as sock:
        assert request(sock, "/peer")["peer"] is None
