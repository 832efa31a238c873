"""Slot allocation for the data plane's arrays: rule counters, interfaces, services, backends."""

from __future__ import annotations

import heapq
from collections.abc import Iterable

import numpy as np

from xdpfw.errors import MapFullError


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
        reuse = [heapq.heappop(self.free) for _ in range(min(n, len(self.free)))]
        fresh = n - len(reuse)
        if self.high + fresh > self.capacity:
            for s in reuse:
                heapq.heappush(self.free, s)
            raise MapFullError(
                f"no room for {n} more {what}: capacity is {self.capacity} "
                "(raise limits in the config; pinned maps must then be recreated)"
            )
        out = np.concatenate([np.array(reuse, dtype=np.uint32),
                              np.arange(self.high, self.high + fresh, dtype=np.uint32)])
        self.high += fresh
        return out

    def give(self, slots: Iterable[int] | np.ndarray) -> None:
        for s in np.asarray(list(slots) if not isinstance(slots, np.ndarray) else slots,
                            dtype=np.int64).tolist():
            heapq.heappush(self.free, s)
