"""What a fleet node remembers of etcd between runs, beside its rules in the same store file.

The rules themselves are the firewall's store (xdpfw/rules/store.py): a node restarted while
etcd is away restores them from there and keeps guarding. This table says which etcd (its
cluster id) and which revision they are from, so the node resumes its watch where it was.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from xdpfw.db import SqliteDb

SCHEMA = """
CREATE TABLE IF NOT EXISTS fleet_state (key TEXT PRIMARY KEY, value TEXT NOT NULL);
-- The manifest of each set as this node applied it: which of its rules are whose.
CREATE TABLE IF NOT EXISTS fleet_sets (name TEXT PRIMARY KEY, manifest BLOB NOT NULL);
"""


class Position(NamedTuple):
    cluster_id: str  # "" before the first sync
    resume: int  # the revision up to which every change of data/ has been seen
    applied: int  # the revision of the last data change applied (the fleet's to compare)


class FleetCache(SqliteDb):
    def __init__(self, path: Path | str) -> None:
        super().__init__(path, SCHEMA)

    def position(self) -> Position:
        rows = dict(self._db.execute("SELECT key, value FROM fleet_state"))
        return Position(rows.get("cluster_id", ""), int(rows.get("resume", 0)),
                        int(rows.get("applied", 0)))

    def sets(self) -> dict[str, bytes]:
        return dict(self._db.execute("SELECT name, manifest FROM fleet_sets"))

    def save_set(self, name: str, manifest: bytes | None) -> None:
        with self.transaction():
            if manifest is None:
                self._db.execute("DELETE FROM fleet_sets WHERE name = ?", (name,))
            else:
                self._db.execute("INSERT OR REPLACE INTO fleet_sets (name, manifest)"
                                 " VALUES (?, ?)", (name, manifest))

    def save(self, pos: Position) -> None:
        with self.transaction():
            self._db.executemany(
                "INSERT OR REPLACE INTO fleet_state (key, value) VALUES (?, ?)",
                [("cluster_id", pos.cluster_id), ("resume", str(pos.resume)),
                 ("applied", str(pos.applied))])
