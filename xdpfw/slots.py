"""Slot allocation for the data plane's arrays: rule counters, interfaces, services, backends."""

from __future__ import annotations

import heapq
from collections.abc import Iterable

import numpy as np

from xdpfw.errors import MapFullError

BULK = 64  # more slots than this at once are taken and given back by sorting


class SlotAllocator:
    """Smallest free index first, so counter arrays stay dense. Only the holes below the
    highest slot ever taken are held, so two million rules cost no set or list of ints."""

    def __init__(self, capacity: int, used: Iterable[int] | np.ndarray = (),
                 first: int = 0) -> None:
        self.capacity = capacity
        used = np.fromiter(used, np.int64) if not isinstance(used, np.ndarray) else used
        self.high = int(used.max()) + 1 if len(used) else first
        self.free = np.setdiff1d(np.arange(first, self.high), used).tolist()
        heapq.heapify(self.free)

    def take(self, n: int, what: str) -> list[int]:
        return self.take_array(n, what).tolist()

    def take_array(self, n: int, what: str) -> np.ndarray:
        reuse = self._smallest(min(n, len(self.free)))
        fresh = n - len(reuse)
        if self.high + fresh > self.capacity:
            self.give(reuse)
            raise MapFullError(
                f"no room for {n} more {what}: capacity is {self.capacity} "
                "(raise limits in the config; pinned maps must then be recreated)"
            )
        out = np.concatenate([np.array(reuse, dtype=np.uint32),
                              np.arange(self.high, self.high + fresh, dtype=np.uint32)])
        self.high += fresh
        return out

    def _smallest(self, k: int) -> list[int]:
        """The k smallest free slots, out of the heap (many at once: by sorting, in C)."""
        if k <= BULK:
            return [heapq.heappop(self.free) for _ in range(k)]
        ordered = sorted(self.free)
        self.free = ordered[k:]  # a sorted list is a heap
        return ordered[:k]

    def give(self, slots: Iterable[int] | np.ndarray) -> None:
        back = np.asarray(list(slots) if not isinstance(slots, np.ndarray) else slots,
                          dtype=np.int64).tolist()
        if len(back) <= BULK:
            for s in back:
                heapq.heappush(self.free, s)
        else:  # a set replace frees half a million: one heapify, not a push each
            self.free.extend(back)
            heapq.heapify(self.free)
