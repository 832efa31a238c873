"""A rate limit on log records, so that a flood (accept errors, bad requests) cannot fill the
disk through the log."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable


class RateLimit(logging.Filter):
    """Per period: at most `burst` records of one kind (logger, level and message template,
    before its arguments are filled in) and `total` records in all. What is held back is
    counted, and the next record of that kind let through says how many there were."""

    def __init__(
        self,
        burst: int = 20,
        total: int = 200,
        period: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self.burst, self.total, self.period, self.clock = burst, total, period, clock
        self._lock = threading.Lock()
        self._start = clock()
        self._seen: dict[tuple, int] = {}
        self._held: dict[tuple, int] = {}
        self._count = 0

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.levelno, str(record.msg))
        with self._lock:
            now = self.clock()
            if now - self._start >= self.period:
                self._start, self._seen, self._count = now, {}, 0
            seen = self._seen[key] = self._seen.get(key, 0) + 1
            if seen > self.burst or self._count >= self.total:
                if len(self._held) < 10_000 or key in self._held:  # bounded, like the rest
                    self._held[key] = self._held.get(key, 0) + 1
                return False
            self._count += 1
            held = self._held.pop(key, 0)
        if held:
            record.msg = f"{record.getMessage()} [{held} more like this were not logged]"
            record.args = None
        return True


def install(limit: RateLimit | None = None) -> RateLimit:
    """Put the limit on every handler of the root logger (a filter on a logger would miss
    records propagated from its children: uvicorn, asyncio)."""
    limit = limit or RateLimit()
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for handler in root.handlers:
        if limit not in handler.filters:
            handler.addFilter(limit)
    return limit
