"""A ring buffer of the running build, read on a thread of its own.

BCC opens a ring buffer through the build's module, so each build has its own reader: the
Dataplane binds it to every new build an upgrade brings (Dataplane.read_events).
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable

from xdpfw.dataplane.loader import LoadedProgram

POLL_MS = 50  # how often the reader drains the ring (and notices a stop or an upgrade)


class RingReader:
    def __init__(self, map_name: str, on_record: Callable[[bytes], None]) -> None:
        """on_record: called on the reader's thread with each record's bytes."""
        self.map_name = map_name
        self.on_record = on_record
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._bpf = None

    def bind(self, program: LoadedProgram) -> None:
        """Read `program`'s ring buffer (instead of the one read so far)."""
        self.unbind()
        program.table(self.map_name).open_ring_buffer(self._callback)
        self._bpf = program.bpf
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, args=(program.bpf, self._stop),
                                        name=f"xdpfw-{self.map_name}", daemon=True)
        self._thread.start()

    def unbind(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        from bcc.libbcc import lib  # the ring buffer manager BCC does not free on cleanup

        if self._bpf is not None and self._bpf._ringbuf_manager:
            lib.bpf_free_ringbuf(self._bpf._ringbuf_manager)
            self._bpf._ringbuf_manager = None
        self._bpf = None

    def _callback(self, _ctx, data, size) -> int:
        self.on_record(ctypes.string_at(data, size))
        return 0

    @staticmethod
    def _poll(bpf, stop: threading.Event) -> None:
        """Drain the ring on a timer: the program submits without waking the reader (a wake-up
        cost each sampled drop microseconds), so an epoll wait would never return early."""
        while not stop.wait(POLL_MS / 1000):
            bpf.ring_buffer_consume()
