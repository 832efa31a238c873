"""A map from 64-bit keys to int64 values in two numpy arrays (open addressing, linear
probing): 16 bytes a slot at most half full, where a Python dict of ints costs ~100 bytes an
entry. Bulk operations are vectorised; single ones cost a few microseconds.

Keys must be below RESERVED (the two top values mark empty and deleted slots). Deleted slots
stay tombstones until the table is rebuilt (on growth, or when tombstones fill a quarter).
"""

from __future__ import annotations

import numpy as np

EMPTY = np.uint64(0xFFFFFFFFFFFFFFFF)
TOMB = np.uint64(0xFFFFFFFFFFFFFFFE)
RESERVED = int(TOMB)
_MUL_INT = 0x9E3779B97F4A7C15
_MUL = np.uint64(_MUL_INT)
_U64 = (1 << 64) - 1


def _home(keys: np.ndarray, mask: int) -> np.ndarray:
    """Fibonacci hashing (the top bits of key * 2^64/phi), so sequential keys spread."""
    with np.errstate(over="ignore"):
        return ((keys * _MUL) >> np.uint64(32)).astype(np.int64) & mask


class U64Map:
    def __init__(self, capacity: int = 1024, values=np.int64) -> None:
        """values: the values' dtype (int32 where they are rows or ids: 12 bytes a slot)."""
        size = 1 << max(10, (2 * capacity - 1).bit_length())
        self._keys = np.full(size, EMPTY, dtype=np.uint64)
        self._vals = np.zeros(size, dtype=values)
        self._used = 0  # live entries
        self._tombs = 0

    def __len__(self) -> int:
        return self._used

    def nbytes(self) -> int:
        return self._keys.nbytes + self._vals.nbytes

    # -- single keys ----------------------------------------------------------------------

    def _slot(self, key: int) -> tuple[int, bool]:
        """(slot of key, True) or (slot to insert it at, False)."""
        keys, mask = self._keys, len(self._keys) - 1
        k = np.uint64(key)
        i = (((key * _MUL_INT) & _U64) >> 32) & mask  # _home, in Python ints
        free = -1
        while True:
            here = keys[i]
            if here == k:
                return i, True
            if here == EMPTY:
                return (free if free >= 0 else i), False
            if here == TOMB and free < 0:
                free = i
            i = (i + 1) & mask

    def get(self, key: int, default: int | None = None) -> int | None:
        i, found = self._slot(key)
        return int(self._vals[i]) if found else default

    def __getitem__(self, key: int) -> int:
        i, found = self._slot(key)
        if not found:
            raise KeyError(key)
        return int(self._vals[i])

    def __contains__(self, key: int) -> bool:
        return self._slot(key)[1]

    def put(self, key: int, value: int) -> None:
        self._grow(1)
        i, found = self._slot(key)
        if not found:
            if self._keys[i] == TOMB:
                self._tombs -= 1
            self._keys[i] = key
            self._used += 1
        self._vals[i] = value

    def pop(self, key: int, default: int | None = None) -> int | None:
        i, found = self._slot(key)
        if not found:
            return default
        self._keys[i] = TOMB
        self._used -= 1
        self._tombs += 1
        return int(self._vals[i])

    # -- many keys ------------------------------------------------------------------------

    def _find(self, keys: np.ndarray) -> np.ndarray:
        """The slot of each key, -1 where absent."""
        out = np.full(len(keys), -1, dtype=np.int64)
        mask = len(self._keys) - 1
        pos = _home(keys, mask)
        todo = np.arange(len(keys))
        while len(todo):
            here = self._keys[pos[todo]]
            hit = here == keys[todo]
            out[todo[hit]] = pos[todo[hit]]
            todo = todo[~hit & (here != EMPTY)]  # tombstones and other keys: keep probing
            pos[todo] = (pos[todo] + 1) & mask
        return out

    def get_many(self, keys: np.ndarray, default: int = -1) -> np.ndarray:
        slots = self._find(np.asarray(keys, dtype=np.uint64))
        out = np.full(len(slots), default, dtype=np.int64)
        hit = slots >= 0
        out[hit] = self._vals[slots[hit]]
        return out

    def put_many(self, keys: np.ndarray, values: np.ndarray) -> None:
        """Insert or overwrite; keys must be unique within the call."""
        keys = np.asarray(keys, dtype=np.uint64)
        values = np.asarray(values, dtype=self._vals.dtype)
        self._grow(len(keys))
        slots = self._find(keys)
        there = slots >= 0
        self._vals[slots[there]] = values[there]
        keys, values = keys[~there], values[~there]
        # Absent keys take the first free slot (empty or tombstone) of their probe; several
        # keys wanting the same slot: the first takes it, the others probe on.
        mask = len(self._keys) - 1
        pos = _home(keys, mask)
        todo = np.arange(len(keys))
        while len(todo):
            here = self._keys[pos[todo]]
            cand = todo[(here == EMPTY) | (here == TOMB)]
            _, first = np.unique(pos[cand], return_index=True)
            winners = cand[first]
            wp = pos[winners]
            self._tombs -= int((self._keys[wp] == TOMB).sum())
            self._keys[wp] = keys[winners]
            self._vals[wp] = values[winners]
            self._used += len(winners)
            placed = np.zeros(len(keys), dtype=bool)
            placed[winners] = True
            todo = todo[~placed[todo]]
            pos[todo] = (pos[todo] + 1) & mask

    def pop_many(self, keys: np.ndarray) -> np.ndarray:
        """Remove keys; returns their values (-1 where absent)."""
        keys = np.asarray(keys, dtype=np.uint64)
        out = np.full(len(keys), -1, dtype=np.int64)
        mask = len(self._keys) - 1
        pos = _home(keys, mask)
        todo = np.arange(len(keys))
        while len(todo):
            p = pos[todo]
            here = self._keys[p]
            hit = here == keys[todo]
            out[todo[hit]] = self._vals[p[hit]]
            self._keys[p[hit]] = TOMB
            n = int(hit.sum())
            self._used -= n
            self._tombs += n
            todo = todo[~hit & (here != EMPTY)]
            pos[todo] = (pos[todo] + 1) & mask
        return out

    def items(self) -> tuple[np.ndarray, np.ndarray]:
        live = self._keys < TOMB
        return self._keys[live].copy(), self._vals[live].copy()

    def reserve(self, more: int) -> None:
        """Room for `more` new keys in one allocation (a bulk load then grows once)."""
        self._grow(more)

    def _grow(self, more: int) -> None:
        """Keep the table at most half full (tombstones included): rebuild when needed."""
        size = len(self._keys)
        if (self._used + self._tombs + more) * 2 <= size:
            return
        need = self._used + more
        new = size
        while need * 2 > new:
            new *= 2
        keys, vals = self.items()
        self._keys = np.full(new, EMPTY, dtype=np.uint64)
        self._vals = np.zeros(new, dtype=self._vals.dtype)
        self._used = self._tombs = 0
        if len(keys):
            self.put_many(keys, vals)
