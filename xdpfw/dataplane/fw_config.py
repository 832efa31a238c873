"""The program-wide settings entry (pinned map fw_config, key 0): the drop-event sample rate,
which IPv6 source maps the program may skip because they are empty, whether a capture runs
(xdpfw/dataplane/capture_maps.py; cleared at start, since no capture outlives its daemon),
and the hostless_v6 bitmap over the IPv6 host hash.

Skipping an empty map saves a packet a lookup that can only miss (an empty LPM trie still
costs a call; an empty hash a hash and a bucket). The bits must never hide a rule, so:
  - a bit is cleared *before* anything is written to its map (`writing`);
  - it is set only when its map is empty *and* no write to it is in flight (`refresh`);
  - all zero means "search everything", so a fresh map, or one from a version before this,
    is slow at worst, never wrong.
One lock orders both, so a refresh cannot read "empty" between a writer's clear and its
write and then set the bit after it.

hostless_v6 follows the same rule per bucket of /64s (xdpfw_abi.h: XDPFW_HOSTLESS_V6_*): a
set bit says "no /128 rule in any /64 of this bucket", so most IPv6 misses skip the host
hash. Writing hosts clears their buckets' bits first; only a rebuild from hosts_v6 itself
sets bits (at start, at upgrade, and a moment after deletes), so a bitmap from before a
crash, or none at all, is never trusted.
"""

from __future__ import annotations

import contextlib
import struct
import threading
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import numpy as np

from xdpfw.dataplane import abi
from xdpfw.errors import XdpfwError

if TYPE_CHECKING:
    from xdpfw.dataplane.maps import MapHandle

_KEY = struct.pack("<I", 0)
_ALL_ONES = np.uint64((1 << 64) - 1)
REBUILD_AFTER_S = 1.0  # deletes are batched into one rebuild of the bitmap
# IPv6 source map -> its fw_cfg.skip bit.
SKIP_BITS = {"hosts_v6": abi.SKIP_HOSTS_V6, "rules_v6": abi.SKIP_RULES_V6}


def v6_buckets(keys: bytes) -> np.ndarray:
    """hostless_v6 buckets of packed /128 keys (16 bytes each): the /64, Fibonacci-hashed
    to 24 bits, exactly as the program's v6_bucket() does."""
    his = np.frombuffer(keys, dtype=">u8")[0::2].astype(np.uint64)
    with np.errstate(over="ignore"):
        return (his * np.uint64(abi.V6_BUCKET_MUL)) >> np.uint64(64 - abi.HOSTLESS_V6_BITS)


class FwConfig:
    def __init__(self, handle: MapHandle, hosts_v6: MapHandle, hostless_v6: MapHandle) -> None:
        """handle: the fw_config map; hostless_v6: the /64-bucket bitmap over hosts_v6."""
        self._handle = handle
        self._hosts_v6 = hosts_v6
        self._hostless = hostless_v6
        if hostless_v6.max_entries != abi.HOSTLESS_V6_WORDS:
            raise XdpfwError(f"hostless_v6 has {hostless_v6.max_entries} words, not "
                             f"{abi.HOSTLESS_V6_WORDS}")
        self._lock = threading.Lock()
        self._inflight: Counter[str] = Counter()
        self._rebuild_timer: threading.Timer | None = None
        raw = handle.lookup(_KEY)
        self._value = abi.FwCfg.from_buffer_copy(raw) if raw else abi.FwCfg()
        if self._value.capture:  # no capture outlives the process that ran it
            self._store(capture=0)

    def set_sample_rate(self, rate: int) -> None:
        with self._lock:
            self._store(rate=rate)

    def set_capture(self, on: bool) -> None:
        """The flag the program tests on every verdict: set only while a capture runs
        (xdpfw/capture.py), after capture_config says what to take."""
        with self._lock:
            self._store(capture=int(on))

    @contextlib.contextmanager
    def writing(self, maps: Iterable[MapHandle], host_keys_v6: bytes = b"") -> Iterator[None]:
        """Around a write to `maps` (host_keys_v6: the keys going into hosts_v6): their bits,
        and the hostless bits of those hosts' buckets, are clear before it starts, and stay
        clear until it has ended (a concurrent refresh sees the write in flight)."""
        names = [m.name for m in maps if m.name in SKIP_BITS]
        with self._lock:
            self._inflight.update(names)
        try:
            with self._lock:
                bits = sum({SKIP_BITS[n] for n in names})
                if self._value.skip & bits:
                    self._store(skip=self._value.skip & ~bits)
                if host_keys_v6:
                    self._clear_hostless(v6_buckets(host_keys_v6))
            yield
        finally:
            with self._lock:
                self._inflight.subtract(names)

    def refresh(self, maps: Iterable[MapHandle], deleted_hosts_v6: bool = False) -> None:
        """Set the bits of those `maps` that are empty and not being written; clear the rest
        (a map written behind our back is searched again). deleted_hosts_v6: some /128s went,
        so their buckets may be hostless now: the bitmap is rebuilt a moment later."""
        with self._lock:
            skip = self._value.skip
            for m in maps:
                bit = SKIP_BITS.get(m.name)
                if bit is None:
                    continue
                if self._inflight[m.name] or m.has_keys():
                    skip &= ~bit
                else:
                    skip |= bit
            if skip != self._value.skip:
                self._store(skip=skip)
            if deleted_hosts_v6 and self._rebuild_timer is None:
                self._rebuild_timer = threading.Timer(REBUILD_AFTER_S, self._rebuild_later)
                self._rebuild_timer.daemon = True
                self._rebuild_timer.start()

    def resync(self, maps: Iterable[MapHandle]) -> None:
        """Start-up and upgrades: the skip bits of `maps` (the IPv6 source maps) and the whole
        bitmap from what the maps hold now, whatever the pinned entries said."""
        self.refresh(maps)
        with self._lock:
            self._rebuild_hostless()

    def close(self) -> None:
        with self._lock:
            if self._rebuild_timer is not None:
                self._rebuild_timer.cancel()
                self._rebuild_timer = None

    def _rebuild_later(self) -> None:
        with self._lock:
            self._rebuild_timer = None
            with contextlib.suppress(OSError):  # closed meanwhile: the next start rebuilds
                self._rebuild_hostless()

    def _rebuild_hostless(self) -> None:
        """From hosts_v6 itself, under the lock that orders every host write; not while a
        host write is in flight (its clear must stand until it ends)."""
        if self._inflight[self._hosts_v6.name]:
            return
        words = np.full(abi.HOSTLESS_V6_WORDS, _ALL_ONES, dtype=np.uint64)
        buckets = v6_buckets(self._hosts_v6.dump()[0])
        np.bitwise_and.at(words, (buckets >> np.uint64(6)).astype(np.int64),
                          ~(np.uint64(1) << (buckets & np.uint64(63))))
        self._write_words(np.arange(abi.HOSTLESS_V6_WORDS, dtype=np.uint32), words)

    def _clear_hostless(self, buckets: np.ndarray) -> None:
        """Clear these buckets' bits: every word touched is read from the kernel and written
        back without them (the safe direction never trusts a copy)."""
        word_idx = np.unique((buckets >> np.uint64(6)).astype(np.uint32))
        raw = [self._hostless.lookup(int(w).to_bytes(4, "little")) for w in word_idx]
        words = np.array([int.from_bytes(r, "little") if r else 0 for r in raw],
                         dtype=np.uint64)
        pos = np.searchsorted(word_idx, (buckets >> np.uint64(6)).astype(np.uint32))
        np.bitwise_and.at(words, pos, ~(np.uint64(1) << (buckets & np.uint64(63))))
        self._write_words(word_idx, words)

    def _write_words(self, keys: np.ndarray, values: np.ndarray) -> None:
        self._hostless.update_many(np.ascontiguousarray(keys, dtype=np.uint32).tobytes(),
                                   np.ascontiguousarray(values).tobytes(), len(keys))

    def _store(self, *, rate: int | None = None, skip: int | None = None,
               capture: int | None = None) -> None:
        value = abi.FwCfg(
            sample_rate=self._value.sample_rate if rate is None else rate,
            skip=self._value.skip if skip is None else skip,
            capture=self._value.capture if capture is None else capture,
        )
        self._handle.update(_KEY, bytes(value))
        self._value = value
