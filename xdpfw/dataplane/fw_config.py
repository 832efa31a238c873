"""The program-wide settings entry (pinned map fw_config, key 0): the drop-event sample rate,
and which source maps the program may skip because they are empty.

Skipping an empty map saves a packet a lookup that can only miss (an empty LPM trie still
costs a call; an empty hash a hash and a bucket). The bits must never hide a rule, so:
  - a bit is cleared *before* anything is written to its map (`writing`);
  - it is set only when its map is empty *and* no write to it is in flight (`refresh`);
  - all zero means "search everything", so a fresh map, or one from a version before this,
    is slow at worst, never wrong.
One lock orders both, so a refresh cannot read "empty" between a writer's clear and its
write and then set the bit after it.
"""

from __future__ import annotations

import contextlib
import struct
import threading
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from xdpfw.dataplane import abi

if TYPE_CHECKING:
    from xdpfw.dataplane.maps import MapHandle

_KEY = struct.pack("<I", 0)


class FwConfig:
    def __init__(self, handle: MapHandle, skip_bits: dict[str, int]) -> None:
        """handle: the fw_config map; skip_bits: source map name -> its XDPFW_SKIP_* bit."""
        self._handle = handle
        self._bits = skip_bits
        self._lock = threading.Lock()
        self._inflight: Counter[str] = Counter()
        raw = handle.lookup(_KEY)
        self._value = abi.FwCfg.from_buffer_copy(raw) if raw else abi.FwCfg()

    @property
    def sample_rate(self) -> int:
        return self._value.sample_rate

    @property
    def skip(self) -> int:
        return self._value.skip

    def set_sample_rate(self, rate: int) -> None:
        with self._lock:
            self._store(rate=rate)

    @contextlib.contextmanager
    def writing(self, maps: Iterable[MapHandle]) -> Iterator[None]:
        """Around a write to `maps`: their bits are clear before it starts, and stay clear
        until it has ended (a concurrent refresh sees the write in flight)."""
        names = [m.name for m in maps if m.name in self._bits]
        with self._lock:
            self._inflight.update(names)
            bits = sum({self._bits[n] for n in names})
            if self._value.skip & bits:
                self._store(skip=self._value.skip & ~bits)
        try:
            yield
        finally:
            with self._lock:
                self._inflight.subtract(names)

    def refresh(self, maps: Iterable[MapHandle]) -> None:
        """Set the bits of those `maps` that are empty and not being written; clear the rest
        (a map written behind our back is searched again)."""
        with self._lock:
            skip = self._value.skip
            for m in maps:
                bit = self._bits.get(m.name)
                if bit is None:
                    continue
                if self._inflight[m.name] or m.has_keys():
                    skip &= ~bit
                else:
                    skip |= bit
            if skip != self._value.skip:
                self._store(skip=skip)

    def _store(self, *, rate: int | None = None, skip: int | None = None) -> None:
        value = abi.FwCfg(
            sample_rate=self._value.sample_rate if rate is None else rate,
            skip=self._value.skip if skip is None else skip,
        )
        self._handle.update(_KEY, bytes(value))
        self._value = value
