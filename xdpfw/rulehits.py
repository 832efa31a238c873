"""Rules with the most hits over the last minute (the dashboard's "top rules").

The kernel keeps cumulative counters; a rate needs an earlier reading. Readings are taken
when asked for (at most one per SNAPSHOT_S), kept for the window, and the answer is the
difference between now and the oldest reading inside the window. A reading is two numpy
arrays (rule ids, packets), so even a blocklist of which a million rules matched costs
~12 MB per reading, not a million Python objects.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass

import numpy as np

from xdpfw.service import Firewall

SNAPSHOT_S = 5.0


@dataclass(frozen=True)
class Hits:
    rule_id: int
    packets: int  # in the window
    bytes: int


class RuleHits:
    def __init__(self, firewall: Firewall, window_s: float = 60.0) -> None:
        self.fw = firewall
        self.window_s = window_s
        self._lock = threading.Lock()
        # (monotonic time, ids sorted, packets, bytes)
        self._readings: deque[tuple[float, np.ndarray, np.ndarray, np.ndarray]] = deque()

    def _read(self) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
        counters = self.fw.rule_counters()
        ids = np.fromiter((r.id for r, _, _ in counters), dtype=np.int64, count=len(counters))
        pk = np.fromiter((p for _, p, _ in counters), dtype=np.int64, count=len(counters))
        by = np.fromiter((b for _, _, b in counters), dtype=np.int64, count=len(counters))
        order = np.argsort(ids)
        return time.monotonic(), ids[order], pk[order], by[order]

    def top(self, limit: int = 10) -> tuple[float, list[Hits]]:
        """(seconds the answer covers, the `limit` rules with the most packets in them)."""
        now = self._read()
        with self._lock:
            while self._readings and now[0] - self._readings[0][0] > self.window_s:
                self._readings.popleft()
            base = self._readings[0] if self._readings else now
            if not self._readings or now[0] - self._readings[-1][0] >= SNAPSHOT_S:
                self._readings.append(now)
        _, ids, pk, by = now
        t0, bids, bpk, bby = base
        # A rule's earlier count, 0 if it had not matched (or did not exist) then.
        pos = np.minimum(np.searchsorted(bids, ids), max(len(bids) - 1, 0))
        known = (bids[pos] == ids) if len(bids) else np.zeros(len(ids), dtype=bool)
        dp = pk - np.where(known, bpk[pos] if len(bids) else 0, 0)
        db = by - np.where(known, bby[pos] if len(bids) else 0, 0)
        # A counter that went down was reset (its slot reused): count from zero.
        dp, db = np.where(dp < 0, pk, dp), np.where(dp < 0, by, db)
        best = np.argsort(-dp, kind="stable")[:limit]
        return now[0] - t0, [Hits(int(ids[i]), int(dp[i]), int(db[i])) for i in best
                             if dp[i] > 0]
