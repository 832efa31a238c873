"""A ring buffer of the running build, read on a thread of its own.

A ring buffer belongs to a build (it is not pinned), so each reader is bound to every new
build an upgrade brings (Dataplane.read_ring). Each reader has a ring-buffer manager of its
own (libbcc's bpf_new_ringbuf), not the one BCC keeps per build: that one consumes every ring
of the build at once, so two readers (drop events, capture) would take each other's records,
and freeing it for one would stop the other.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable

from xdpfw.dataplane.loader import LoadedProgram

POLL_MS = 50  # how often the reader drains the ring (and notices a stop or an upgrade)


class RingReader:
    def __init__(self, map_name: str, on_record: Callable[[bytes], None],
                 wakeups: bool = False) -> None:
        """on_record: called on the reader's thread with each record's bytes.
        wakeups: the program submits with wake-ups (epoll returns at once); otherwise it
        submits without, and the ring is drained on a timer."""
        self.map_name = map_name
        self.on_record = on_record
        self.wakeups = wakeups
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._manager: int | None = None
        self._cb = None  # the ctypes callback: must live as long as the manager

    def bind(self, program: LoadedProgram) -> None:
        """Read `program`'s ring buffer (instead of the one read so far)."""
        from bcc.libbcc import _RINGBUF_CB_TYPE, lib

        self.unbind()
        self._cb = _RINGBUF_CB_TYPE(self._callback)
        manager = lib.bpf_new_ringbuf(program.table(self.map_name).map_fd, self._cb, None)
        if not manager:
            raise OSError(f"could not open the ring buffer {self.map_name}")
        self._manager = manager
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, args=(manager, self._stop),
                                        name=f"xdpfw-{self.map_name}", daemon=True)
        self._thread.start()

    def unbind(self) -> None:
        if self._thread is None:
            return
        from bcc.libbcc import lib

        self._stop.set()
        self._thread.join()
        self._thread = None
        lib.bpf_free_ringbuf(self._manager)
        self._manager = None

    def _callback(self, _ctx, data, size) -> int:
        self.on_record(ctypes.string_at(data, size))
        return 0

    def _poll(self, manager: int, stop: threading.Event) -> None:
        from bcc.libbcc import lib

        if self.wakeups:  # epoll: returns as soon as records come, else after POLL_MS
            while not stop.is_set():
                # A wake-up can be late (it is sent from irq_work): on a quiet timeout,
                # look anyway, so records never wait longer than POLL_MS.
                if lib.bpf_poll_ringbuf(manager, POLL_MS) == 0:
                    lib.bpf_consume_ringbuf(manager)
            return
        # Drain on a timer: drop events are submitted without a wake-up (one cost each
        # sampled drop microseconds), so an epoll wait would never return early.
        while not stop.wait(POLL_MS / 1000):
            lib.bpf_consume_ringbuf(manager)
