"""Plain user-space TCP relay on asyncio: the fallback when the kernel will not splice, and the
comparison proxy of scripts/bench_proxy.py. Every payload byte is copied through this process.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field

RELAY_BUFSIZE = 256 * 1024

# A watch task beside a pair's directions (watch_pair): run by finish_pair with them.
Watch = Callable[[list[asyncio.Future]], Coroutine[None, None, None]]


class ConnectionAborted(Exception):
    """A proxied connection was reset, its peer vanished, or a limit ended it; both sides get
    a RST."""


@dataclass
class RelayCounters:
    """Bytes this process copied; updated by the loop thread, read from any thread."""

    bytes_to_backend: int = 0
    bytes_to_client: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, to_backend: int = 0, to_client: int = 0) -> None:
        with self._lock:
            self.bytes_to_backend += to_backend
            self.bytes_to_client += to_client

    def snapshot(self) -> tuple[int, int]:
        with self._lock:
            return self.bytes_to_backend, self.bytes_to_client


def abort(sock: socket.socket) -> None:
    """Close with RST (SO_LINGER 0): tells the far end the stream did not end cleanly."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


async def _pump(loop: asyncio.AbstractEventLoop, src: socket.socket, dst: socket.socket,
                counters: RelayCounters, to_backend: bool, bufsize: int) -> None:
    buf = bytearray(bufsize)
    view = memoryview(buf)
    while True:
        n = await loop.sock_recv_into(src, buf)
        if n == 0:
            break
        await loop.sock_sendall(dst, view[:n])
        if to_backend:
            counters.add(to_backend=n)
        else:
            counters.add(to_client=n)
    # Half-close: the source finished writing, so finish writing to the destination; the
    # other direction keeps flowing until its own EOF.
    dst.shutdown(socket.SHUT_WR)


async def relay_pair(client: socket.socket, backend: socket.socket, counters: RelayCounters,
                     bufsize: int = RELAY_BUFSIZE, watch: Watch | None = None) -> None:
    """Copy both directions until both have ended, then close both sockets.

    A reset or error on either side aborts both (RST), so neither peer mistakes a broken
    stream for a complete one. Cancellation aborts both too, and so does `watch` (given the
    two directions' tasks) raising. Sockets must be non-blocking.
    """
    loop = asyncio.get_running_loop()
    tasks = [
        asyncio.ensure_future(_pump(loop, client, backend, counters, True, bufsize)),
        asyncio.ensure_future(_pump(loop, backend, client, counters, False, bufsize)),
    ]
    if watch is not None:
        tasks.append(asyncio.ensure_future(watch(tasks[:])))
    await finish_pair(tasks, client, backend)


async def watch_pair(tasks: list[asyncio.Future], check: Callable[[float], bool], *,
                     fast: float, slow: float) -> None:
    """Until `tasks` (a pair's two directions) have ended, call check(time.monotonic()) every
    `fast` seconds while it answers busy, else at an interval that doubles up to `slow`.
    check raises (ConnectionAborted) to end the pair; an OSError from it means a socket went,
    which the tasks report themselves."""
    pending, delay = set(tasks), fast
    while pending:
        _, pending = await asyncio.wait(pending, timeout=delay)
        if any(t.done() and (t.cancelled() or t.exception()) for t in tasks):
            return  # finish_pair resets the pair already
        if not pending:
            return
        try:
            busy = check(time.monotonic())
        except OSError:
            return
        delay = fast if busy else min(delay * 2, slow)


async def finish_pair(
    tasks: list[asyncio.Future], client: socket.socket, backend: socket.socket
) -> bool:
    """Wait for both directions of a proxied connection; the first error cancels the other.
    Both sockets are then closed: cleanly (FIN) if both directions ended well, else with a
    reset, so neither peer mistakes a broken stream for a complete one. Returns which."""
    clean = False
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        clean = len(done) == len(tasks) and all(
            not t.cancelled() and t.exception() is None for t in done
        )
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for s in (client, backend):
            if clean:
                s.close()
            else:
                abort(s)
    return clean
