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

The same rule, per IPv4 /24, keeps the hostless_v4 bitmap: a bit says "no host (/32) rule in
this /24", so most misses skip the host hash. Writing hosts clears their /24s' bits first;
deleting hosts sets a bit once hosts_v4 holds none of the /24's 256 addresses; start-up
rebuilds the whole bitmap from hosts_v4 itself, so a bitmap from before a crash, or none at
all, is never trusted.
"""

from __future__ import annotations

import contextlib
import struct
import sys
import threading
from array import array
from collections import Counter
from collections.abc import Iterable, Iterator
from itertools import repeat
from operator import rshift
from typing import TYPE_CHECKING

from xdpfw.dataplane import abi
from xdpfw.errors import XdpfwError

if TYPE_CHECKING:
    from xdpfw.dataplane.maps import MapHandle

_KEY = struct.pack("<I", 0)
_ALL_ONES = (1 << 64) - 1
PROBE_24S_UP_TO = 64  # deleted hosts' /24s probed one by one; more: rebuild from hosts_v4
# Source map -> its fw_cfg.skip bit.
SKIP_BITS = {
    "hosts_v4": abi.SKIP_HOSTS_V4,
    "rules_v4": abi.SKIP_RULES_V4,
    "hosts_v6": abi.SKIP_HOSTS_V6,
    "rules_v6": abi.SKIP_RULES_V6,
}


def _slash24s(keys: bytes) -> set[int]:
    """The /24 numbers (address >> 8) of packed hosts_v4 keys (4 bytes each, big-endian)."""
    addrs = array("I", keys)
    if sys.byteorder == "little":
        addrs.byteswap()
    return set(map(rshift, addrs, repeat(8)))


class FwConfig:
    def __init__(self, handle: MapHandle, hosts_v4: MapHandle, hostless_v4: MapHandle) -> None:
        """handle: the fw_config map; hostless_v4: the /24 bitmap over hosts_v4."""
        self._handle = handle
        self._hosts_v4 = hosts_v4
        self._hostless = hostless_v4
        # What the kernel's bitmap holds, read back: a bit is only ever changed in a word
        # written whole, so this copy must be the kernel's, not a guess.
        self._words = array("Q", hostless_v4.dump()[1])
        if len(self._words) != abi.HOSTLESS_V4_WORDS:
            raise XdpfwError(f"hostless_v4 has {len(self._words)} words, not "
                             f"{abi.HOSTLESS_V4_WORDS}")
        self._lock = threading.Lock()
        self._inflight: Counter[str] = Counter()
        raw = handle.lookup(_KEY)
        self._value = abi.FwCfg.from_buffer_copy(raw) if raw else abi.FwCfg()

    def set_sample_rate(self, rate: int) -> None:
        with self._lock:
            self._store(rate=rate)

    @contextlib.contextmanager
    def writing(self, maps: Iterable[MapHandle], host_keys_v4: bytes = b"") -> Iterator[None]:
        """Around a write to `maps` (host_keys_v4: the keys going into hosts_v4): their bits,
        and the hostless bits of those hosts' /24s, are clear before it starts, and stay clear
        until it has ended (a concurrent refresh sees the write in flight)."""
        names = [m.name for m in maps if m.name in SKIP_BITS]
        with self._lock:
            self._inflight.update(names)
        try:
            with self._lock:
                bits = sum({SKIP_BITS[n] for n in names})
                if self._value.skip & bits:
                    self._store(skip=self._value.skip & ~bits)
                if host_keys_v4:
                    self._set_hostless(_slash24s(host_keys_v4), False)
            yield
        finally:
            with self._lock:
                self._inflight.subtract(names)

    def refresh(self, maps: Iterable[MapHandle], deleted_hosts_v4: Iterable[int] = ()) -> None:
        """Set the bits of those `maps` that are empty and not being written; clear the rest
        (a map written behind our back is searched again). deleted_hosts_v4: addresses just
        removed from hosts_v4, whose /24s may now be hostless."""
        with self._lock:
            gone = {a >> 8 for a in deleted_hosts_v4}
            if gone and not self._inflight[self._hosts_v4.name]:
                if len(gone) > PROBE_24S_UP_TO:
                    self._rebuild_hostless()
                else:
                    self._set_hostless({s for s in gone if self._hostless_in_kernel(s)}, True)
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

    def resync(self, maps: Iterable[MapHandle]) -> None:
        """Start-up and upgrades: the skip bits of `maps` (every source map) and the whole
        bitmap from what the maps hold now, whatever the pinned entries said."""
        self.refresh(maps)
        with self._lock:
            if not self._inflight[self._hosts_v4.name]:
                self._rebuild_hostless()

    @property
    def hostless_map(self) -> MapHandle:
        return self._hostless

    def _rebuild_hostless(self) -> None:
        words = array("Q", repeat(_ALL_ONES, abi.HOSTLESS_V4_WORDS))
        for s in _slash24s(self._hosts_v4.dump()[0]):
            words[s >> 6] &= ~(1 << (s & 63))
        keys = array("I", range(abi.HOSTLESS_V4_WORDS))
        # Computed from the map itself, under the lock that orders every host write.
        self._write_words(keys, words)
        self._words = words

    def _hostless_in_kernel(self, slash24: int) -> bool:
        """No address of this /24 in hosts_v4 (256 lookups)."""
        base = slash24 << 8
        lookup = self._hosts_v4.lookup
        return not any(lookup((base | i).to_bytes(4, "big")) is not None for i in range(256))

    def _set_hostless(self, slash24s: Iterable[int], hostless: bool) -> None:
        words, new = self._words, {}
        for s in slash24s:
            w, bit = s >> 6, 1 << (s & 63)
            old = new.get(w, words[w])
            new[w] = old | bit if hostless else old & ~bit
        # Clearing writes every word it touches, changed or not: the safe direction does not
        # depend on this copy being the kernel's. Setting writes only what changes.
        if hostless:
            new = {w: v for w, v in new.items() if v != words[w]}
        if not new:
            return
        self._write_words(array("I", new), array("Q", new.values()))
        for w, v in new.items():
            words[w] = v

    def _write_words(self, keys: array, values: array) -> None:
        try:
            self._hostless.update_many(keys.tobytes(), values.tobytes(), len(keys))
        except BaseException:
            # A batch can stop part way: take the kernel's words as they now are.
            self._words = array("Q", self._hostless.dump()[1])
            raise

    def _store(self, *, rate: int | None = None, skip: int | None = None) -> None:
        value = abi.FwCfg(
            sample_rate=self._value.sample_rate if rate is None else rate,
            skip=self._value.skip if skip is None else skip,
        )
        self._handle.update(_KEY, bytes(value))
        self._value = value
