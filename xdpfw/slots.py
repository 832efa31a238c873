"""Slot allocation for the data plane's arrays: rule counters, interfaces, services, backends."""

from __future__ import annotations

import heapq
from collections.abc import Iterable

from xdpfw.errors import MapFullError


class SlotAllocator:
    """Smallest free index first, so counter arrays stay dense."""

    def __init__(self, capacity: int, used: Iterable[int] = (), first: int = 0) -> None:
        self.capacity = capacity
        used = set(used)
        self.high = max(used, default=first - 1) + 1
        self.free = [s for s in range(first, self.high) if s not in used]
        heapq.heapify(self.free)

    def take(self, n: int, what: str) -> list[int]:
        reuse = [heapq.heappop(self.free) for _ in range(min(n, len(self.free)))]
        fresh = n - len(reuse)
        if self.high + fresh > self.capacity:
            for s in reuse:
                heapq.heappush(self.free, s)
            raise MapFullError(
                f"no room for {n} more {what}: capacity is {self.capacity} "
                "(raise limits in the config; pinned maps must then be recreated)"
            )
        out = reuse + list(range(self.high, self.high + fresh))
        self.high += fresh
        return out

    def give(self, slots: Iterable[int]) -> None:
        for s in slots:
            heapq.heappush(self.free, s)
