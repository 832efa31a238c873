"""The audit trail: every change made to the appliance, when, and by which client, kept in
the store (a table of the firewall's database file, on a connection of its own) and written
to the daemon's log (logger `xdpfw.audit`).

The API records each change that succeeded (xdpfw/api/audit.py) just before its answer goes
out; the daemon records what it changes by itself (rules made equal to the config file).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from xdpfw.db import SqliteDb

log = logging.getLogger("xdpfw.audit")

KEEP = 100_000  # records kept; older ones go
PRUNE_EVERY = 1000  # records written between two prunings

SCHEMA = """
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time REAL NOT NULL,                  -- Unix time, seconds
    client TEXT NOT NULL,                -- who: the unix peer's uid, a TCP token's name, ...
    action TEXT NOT NULL,                -- what was asked: "PUT /api/v1/sets/feed"
    detail TEXT NOT NULL DEFAULT ''      -- what it did: "500000 added, 500000 removed, ..."
);
CREATE INDEX IF NOT EXISTS audit_time ON audit (time);
"""


@dataclass(frozen=True)
class AuditRecord:
    id: int
    time: float
    client: str
    action: str
    detail: str


class AuditLog(SqliteDb):
    def __init__(self, path: Path | str) -> None:
        super().__init__(path, SCHEMA)
        # A record commits without an fsync of its own (the change it records had one): the
        # write-ahead log reaches the disk with the store's next commit or checkpoint, so
        # a rule add pays one fsync, not two. A power cut can lose the newest records.
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._written = 0

    def record(self, client: str, action: str, detail: str = "") -> None:
        log.info("%s: %s%s", client, action, f": {detail}" if detail else "")
        with self.transaction():
            self._db.execute(
                "INSERT INTO audit (time, client, action, detail) VALUES (?, ?, ?, ?)",
                (time.time(), client, action, detail))
            self._written += 1
            if self._written % PRUNE_EVERY == 0:
                self._db.execute(
                    "DELETE FROM audit WHERE id <= (SELECT max(id) FROM audit) - ?", (KEEP,))

    def since(self, when: float = 0.0, after: int = 0, limit: int = 1000
              ) -> list[AuditRecord]:
        """Records from `when` (Unix time) on and with ids above `after` (to page on from
        the last one seen), oldest first, at most `limit`."""
        rows = self._db.execute(
            "SELECT id, time, client, action, detail FROM audit WHERE time >= ? AND id > ?"
            " ORDER BY id LIMIT ?", (when, after, limit))
        return [AuditRecord(*r) for r in rows]
