"""SQLite persistence of rules and interface attachments.

The service writes inside `transaction()` and commits before the API answers, so an
acknowledged rule survives a crash; start-up loads everything back into the maps.
"""

from __future__ import annotations

import contextlib
import itertools
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from xdpfw.rules.model import V4, V6, Action, Prefix, Proto, Rule

ACTIONS = {a.value: a for a in Action}
PROTOS: dict[str, Proto | None] = {p.value: p for p in Proto} | {"": None}

SCHEMA = """
-- Uniqueness of (prefix, proto, dport) and of slots is enforced by the service, which holds
-- every rule in memory; indexes here would only slow a million-rule bulk load.
CREATE TABLE IF NOT EXISTS rules (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    addr BLOB NOT NULL,                  -- network address, 4 or 16 bytes, network order
    plen INTEGER NOT NULL,
    proto TEXT NOT NULL DEFAULT '',      -- '' = any protocol
    dport INTEGER NOT NULL DEFAULT 0,    -- 0 = any port
    action TEXT NOT NULL,
    comment TEXT NOT NULL DEFAULT '',
    slot INTEGER NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS interfaces (
    name TEXT NOT NULL,
    netns TEXT NOT NULL DEFAULT '',      -- '' = the appliance's own namespace
    mode TEXT NOT NULL,
    policy TEXT NOT NULL,
    unparsed_policy TEXT NOT NULL,
    guard_l2 INTEGER NOT NULL,
    slot INTEGER NOT NULL UNIQUE,
    PRIMARY KEY (name, netns)
);
"""


@dataclass(frozen=True)
class InterfaceRecord:
    name: str
    netns: str | None
    mode: str  # as requested: auto, native, generic, offload
    policy: str
    unparsed_policy: str
    guard_l2: bool
    slot: int



class Store:
    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._lock = threading.RLock()
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # a commit is on disk before we answer
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        self._db.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """Commit on success, roll back on any exception (the caller reverts the maps)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # -- rules ----------------------------------------------------------------------------

    def load_rules(self) -> list[Rule]:
        rows = self._db.execute(
            "SELECT id, addr, plen, proto, dport, action, comment, slot FROM rules ORDER BY id"
        )
        # Inlined rather than a call per row: a restart reads back a million of these.
        frm, actions, protos = int.from_bytes, ACTIONS, PROTOS
        return [
            Rule(rid, Prefix(V4 if len(a) == 4 else V6, frm(a, "big"), n), actions[act],
                 protos[proto], dport or None, comment, slot)
            for rid, a, n, proto, dport, act, comment, slot in rows
        ]

    def last_rule_id(self) -> int:
        row = self._db.execute("SELECT seq FROM sqlite_sequence WHERE name='rules'").fetchone()
        return row[0] if row else 0

    def insert_rules(self, rules: Sequence[Rule]) -> None:
        """Column-wise binding: a generator of per-row tuples cost more than SQLite itself
        on a million-rule bulk load."""
        n = len(rules)
        self._db.executemany(
            "INSERT INTO rules (id, addr, plen, proto, dport, action, comment, slot, created)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            zip(
                [r.id for r in rules],
                [r.prefix.packed() for r in rules],
                [r.prefix.length for r in rules],
                [r.proto.value if r.proto else "" for r in rules],
                [r.dport or 0 for r in rules],
                [r.action.value for r in rules],
                [r.comment for r in rules],
                [r.slot for r in rules],
                itertools.repeat(time.time(), n),
                strict=False,  # repeat() is endless
            ),
        )

    def delete_rules(self, ids: Iterable[int]) -> None:
        self._db.executemany("DELETE FROM rules WHERE id = ?", ((i,) for i in ids))

    # -- interfaces -----------------------------------------------------------------------

    def load_interfaces(self) -> list[InterfaceRecord]:
        rows = self._db.execute(
            "SELECT name, netns, mode, policy, unparsed_policy, guard_l2, slot FROM interfaces"
        )
        return [
            InterfaceRecord(n, ns or None, m, p, up, bool(g), s) for n, ns, m, p, up, g, s in rows
        ]

    def upsert_interface(self, rec: InterfaceRecord) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO interfaces"
            " (name, netns, mode, policy, unparsed_policy, guard_l2, slot)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                rec.name,
                rec.netns or "",
                rec.mode,
                rec.policy,
                rec.unparsed_policy,
                int(rec.guard_l2),
                rec.slot,
            ),
        )

    def delete_interface(self, name: str, netns: str | None) -> None:
        self._db.execute(
            "DELETE FROM interfaces WHERE name = ? AND netns = ?", (name, netns or "")
        )
