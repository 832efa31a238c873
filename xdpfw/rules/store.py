"""SQLite persistence of rules and interface attachments.

The service writes inside `transaction()` and commits before the API answers, so an
acknowledged rule survives a crash; start-up loads everything back into the maps.
"""

from __future__ import annotations

import itertools
import operator
import secrets
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from xdpfw.db import SqliteDb
from xdpfw.rules.model import V4, V6, Action, Proto, Rule
from xdpfw.rules.table import ACTION_CODE, PROTO_CODE, Prefixes, RuleTable

BATCH_MIN = 1000  # requests with fewer rules get a row per rule
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
    created REAL NOT NULL,
    rule_set TEXT NOT NULL DEFAULT ''    -- '' = in no set
);
-- A bulk request is stored as rows of packed columns, not a row per rule: a million rules
-- become a handful of blobs. Deleting one of its rules leaves a tombstone.
CREATE TABLE IF NOT EXISTS rule_batches (
    batch INTEGER PRIMARY KEY AUTOINCREMENT,
    ids BLOB NOT NULL,                   -- uint64 little-endian per rule
    slots BLOB NOT NULL,                 -- uint32 little-endian per rule
    families BLOB NOT NULL,              -- one byte per rule: 4 or 6
    addrs BLOB NOT NULL,                 -- 16 bytes per rule, network order (IPv4 right-aligned)
    plens BLOB NOT NULL,                 -- one byte per rule
    proto TEXT NOT NULL DEFAULT '',
    dport INTEGER NOT NULL DEFAULT 0,
    action TEXT NOT NULL,
    comment TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL,
    rule_set TEXT NOT NULL DEFAULT ''
);
-- Ids of batch rules deleted since: a row per id (older stores), or uint64 little-endian
-- blobs, one per request (a set replace deletes half a million in one row).
CREATE TABLE IF NOT EXISTS deleted_batch_rules (id INTEGER PRIMARY KEY);
CREATE TABLE IF NOT EXISTS deleted_ids (ids BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
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


# Column getters for batch rows: map() over them runs in C, a comprehension per rule does not.
_ID, _PREFIX, _SLOT = (operator.attrgetter(f) for f in ("id", "prefix", "slot"))
_FAMILY, _NET, _LENGTH = (operator.attrgetter(f) for f in ("family", "net", "length"))
_KIND = operator.attrgetter("action", "proto", "dport", "comment", "rule_set")


@dataclass(frozen=True)
class InterfaceRecord:
    name: str
    netns: str | None
    mode: str  # as requested: auto, native, generic, offload
    policy: str
    unparsed_policy: str
    guard_l2: bool
    slot: int



# Columns later versions added to tables an older store already has (ALTER TABLE, once).
ADDED_COLUMNS = (
    ("rules", "rule_set", "TEXT NOT NULL DEFAULT ''"),
    ("rule_batches", "rule_set", "TEXT NOT NULL DEFAULT ''"),
)


class Store(SqliteDb):
    def __init__(self, path: Path | str) -> None:
        super().__init__(path, SCHEMA)
        self._migrate()

    def _migrate(self) -> None:
        """Bring a store written by an older version up to this schema, in place: every
        rule it holds keeps its id, slot and meaning (no set)."""
        with self.transaction():
            for table, column, decl in ADDED_COLUMNS:
                have = {r[1] for r in self._db.execute(f"PRAGMA table_info({table})")}
                if column not in have:
                    self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {decl}")

    # -- rules ----------------------------------------------------------------------------

    def load_rules(self) -> list[Rule]:
        return list(self.load_table().iter_rules())

    def load_table(self) -> RuleTable:
        """Every rule, into columns: batches straight from their blobs through numpy (a
        million-rule blocklist builds no Python object per rule)."""
        parts: list[dict[str, np.ndarray]] = []
        table = RuleTable()
        rows = self._db.execute(
            "SELECT id, addr, plen, proto, dport, action, comment, slot, rule_set FROM rules"
            " ORDER BY id"
        ).fetchall()
        if rows:
            ids, addrs, plens, protos, dports, acts, comments, slots, sets = zip(
                *rows, strict=True)
            nets = [int.from_bytes(a, "big") for a in addrs]
            parts.append({
                "ids": np.array(ids, np.int64), "slots": np.array(slots, np.uint32),
                "family": np.array([V4 if len(a) == 4 else V6 for a in addrs], np.uint8),
                "hi": np.array([n >> 64 for n in nets], np.uint64),
                "lo": np.array([n & (2**64 - 1) for n in nets], np.uint64),
                "plen": np.array(plens, np.uint8),
                "proto": np.array([PROTO_CODE[PROTOS[p]] for p in protos], np.uint8),
                "dport": np.array(dports, np.uint16),
                "action": np.array([ACTION_CODE[ACTIONS[a]] for a in acts], np.uint8),
                "comment": np.array([table.comment_id(c) for c in comments], np.uint32),
                "rule_set": np.array([table.set_id(x) for x in sets], np.uint16),
            })
        deleted = self._deleted_ids()
        for ids, slots, fams, addrs, plens, proto, dport, act, comment, rule_set in (
            self._db.execute(
                "SELECT ids, slots, families, addrs, plens, proto, dport, action, comment,"
                " rule_set FROM rule_batches ORDER BY batch")
        ):
            id_col = np.frombuffer(ids, "<u8").astype(np.int64)
            keep = ~np.isin(id_col, deleted)
            halves = np.frombuffer(addrs, ">u8").reshape(-1, 2)
            n = int(keep.sum())
            parts.append({
                "ids": id_col[keep], "slots": np.frombuffer(slots, "<u4")[keep],
                "family": np.frombuffer(fams, np.uint8)[keep],
                "hi": halves[keep, 0].astype(np.uint64), "lo": halves[keep, 1].astype(np.uint64),
                "plen": np.frombuffer(plens, np.uint8)[keep],
                "proto": np.full(n, PROTO_CODE[PROTOS[proto]], np.uint8),
                "dport": np.full(n, dport, np.uint16),
                "action": np.full(n, ACTION_CODE[ACTIONS[act]], np.uint8),
                "comment": np.full(n, table.comment_id(comment), np.uint32),
                "rule_set": np.full(n, table.set_id(rule_set), np.uint16),
            })
        if parts:
            cols = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
            order = np.argsort(cols["ids"], kind="stable")
            table.append(**{k: v[order] for k, v in cols.items()})
        return table

    def identity(self) -> int:
        """This store's random id (63 bits, never 0), made at first use. The pinned maps
        carry it too (xdpfw/dataplane/pins.py), so each knows the other."""
        with self.transaction():
            row = self._db.execute("SELECT value FROM meta WHERE key='store_id'").fetchone()
            if row:
                return row[0]
            store_id = secrets.randbits(63) or 1
            self._db.execute("INSERT INTO meta (key, value) VALUES ('store_id', ?)", (store_id,))
            return store_id

    def last_rule_id(self) -> int:
        row = self._db.execute("SELECT value FROM meta WHERE key='last_rule_id'").fetchone()
        seq = self._db.execute("SELECT seq FROM sqlite_sequence WHERE name='rules'").fetchone()
        return max(row[0] if row else 0, seq[0] if seq else 0)

    def insert_rules(self, rules: Sequence[Rule]) -> None:
        """Small requests get a row per rule; large ones a batch row per kind (action,
        match, comment, set)."""
        if not rules:
            return
        if len(rules) < BATCH_MIN:
            self._insert_rows(rules)
        else:
            kinds = set(map(_KIND, rules))  # in C: no Python frame per rule
            for kind in kinds:
                members = rules if len(kinds) == 1 else [r for r in rules if _KIND(r) == kind]
                self._insert_batch(members, *kind)
        self._note_last_id(rules[-1].id)  # ids ascend

    def _note_last_id(self, last: int) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES ('last_rule_id', ?)",
            (max(self.last_rule_id(), last),),
        )

    def insert_table_rows(self, table: RuleTable, rows: np.ndarray) -> None:
        """Rows of `table` just added (ids ascending): a row each for a small request, a
        batch row per kind (action, match, comment, set) for a large one."""
        if len(rows) < BATCH_MIN:
            self.insert_rules(list(table.iter_rules(rows)))
            return
        c = table.col
        kind = ((c["action"][rows].astype(np.uint64) << np.uint64(56))
                | (c["proto"][rows].astype(np.uint64) << np.uint64(48))
                | (c["dport"][rows].astype(np.uint64) << np.uint64(32))
                | (c["set"][rows].astype(np.uint64) << np.uint64(16)))
        comment = c["comment"][rows]
        if (kind == kind[0]).all() and (comment == comment[0]).all():  # a blocklist
            groups = [rows]
        else:
            _, which = np.unique(np.stack([kind, comment.astype(np.uint64)], axis=1), axis=0,
                                 return_inverse=True)
            which = which.ravel()
            groups = [rows[which == k] for k in range(int(which.max()) + 1)]
        for mine in groups:
            r = table.rule(int(mine[0]))
            prefixes = Prefixes(c["family"][mine], c["hi"][mine], c["lo"][mine], c["plen"][mine])
            self.insert_batch(c["id"][mine], c["slot"][mine], prefixes, r.action, r.proto,
                              r.dport, r.comment, r.rule_set)

    def _insert_batch(self, rules: list[Rule], action, proto, dport, comment,
                      rule_set) -> None:
        prefixes = Prefixes.of(list(map(_PREFIX, rules)))
        self.insert_batch(np.array(list(map(_ID, rules)), np.int64),
                          np.array(list(map(_SLOT, rules)), np.uint32), prefixes,
                          action, proto, dport, comment, rule_set)

    def insert_batch(self, ids: np.ndarray, slots: np.ndarray, prefixes: Prefixes,
                     action: Action, proto: Proto | None, dport: int | None,
                     comment: str, rule_set: str = "") -> None:
        """Rules of one kind (action, match, comment, set) as one batch row, from columns;
        ids ascend."""
        addrs = np.empty((len(ids), 2), dtype=">u8")
        addrs[:, 0], addrs[:, 1] = prefixes.hi, prefixes.lo
        self._db.execute(
            "INSERT INTO rule_batches (ids, slots, families, addrs, plens, proto, dport,"
            " action, comment, created, rule_set) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                ids.astype("<u8").tobytes(),
                slots.astype("<u4").tobytes(),
                prefixes.family.astype(np.uint8).tobytes(),
                addrs.tobytes(),
                prefixes.plen.astype(np.uint8).tobytes(),
                proto.value if proto else "",
                dport or 0,
                action.value,
                comment,
                time.time(),
                rule_set,
            ),
        )
        self._note_last_id(int(ids[-1]))

    def _insert_rows(self, rules: Sequence[Rule]) -> None:
        """Column-wise binding: a generator of per-row tuples cost more than SQLite itself
        on a million-rule bulk load."""
        n = len(rules)
        self._db.executemany(
            "INSERT INTO rules (id, addr, plen, proto, dport, action, comment, slot, created,"
            " rule_set) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
                [r.rule_set for r in rules],
                strict=False,  # repeat() is endless
            ),
        )

    def delete_rules(self, ids: Iterable[int] | np.ndarray) -> None:
        """Rules gone: rows of their own are deleted, batch rules are listed as deleted (one
        blob for the lot). A large delete then compacts the batches."""
        ids = np.unique(np.asarray(ids if isinstance(ids, np.ndarray) else list(ids),
                                   dtype=np.int64))
        if not len(ids):
            return
        lo, hi = int(ids[0]), int(ids[-1])
        own = np.array([i for (i,) in self._db.execute(
            "SELECT id FROM rules WHERE id BETWEEN ? AND ?", (lo, hi))], dtype=np.int64)
        own = own[np.isin(own, ids)]
        if len(own):
            self._db.executemany("DELETE FROM rules WHERE id = ?", ((i,) for i in own.tolist()))
        rest = np.setdiff1d(ids, own, assume_unique=True)
        if len(rest):
            self._db.execute("INSERT INTO deleted_ids (ids) VALUES (?)",
                             (rest.astype("<u8").tobytes(),))
        if len(rest) >= BATCH_MIN:
            self.compact()

    def _deleted_ids(self) -> np.ndarray:
        """Every batch rule deleted since its batch was written, sorted."""
        rows = np.array([i for (i,) in self._db.execute(
            "SELECT id FROM deleted_batch_rules")], dtype=np.int64)
        blobs = [np.frombuffer(b, "<u8").astype(np.int64)
                 for (b,) in self._db.execute("SELECT ids FROM deleted_ids")]
        return np.unique(np.concatenate([rows, *blobs]))

    def compact(self) -> None:
        """Batches with no living rule go, batches more than half dead are written again
        without their dead, and the deleted ids shrink to those still in a batch: a feed
        replaced every hour does not grow the store forever."""
        dead = self._deleted_ids()
        if not len(dead):
            return
        still: list[np.ndarray] = []
        for batch, ids in self._db.execute("SELECT batch, ids FROM rule_batches").fetchall():
            id_col = np.frombuffer(ids, "<u8").astype(np.int64)
            gone = np.isin(id_col, dead)
            k = int(gone.sum())
            if k == len(id_col):
                self._db.execute("DELETE FROM rule_batches WHERE batch = ?", (batch,))
            elif 2 * k > len(id_col):
                self._rewrite_batch(batch, ~gone)
            elif k:
                still.append(id_col[gone])
        self._db.execute("DELETE FROM deleted_batch_rules")
        self._db.execute("DELETE FROM deleted_ids")
        if still:
            self._db.execute("INSERT INTO deleted_ids (ids) VALUES (?)",
                             (np.concatenate(still).astype("<u8").tobytes(),))

    def _rewrite_batch(self, batch: int, keep: np.ndarray) -> None:
        ids, slots, fams, addrs, plens = self._db.execute(
            "SELECT ids, slots, families, addrs, plens FROM rule_batches WHERE batch = ?",
            (batch,)).fetchone()
        cols = [np.frombuffer(ids, "<u8")[keep], np.frombuffer(slots, "<u4")[keep],
                np.frombuffer(fams, np.uint8)[keep],
                np.frombuffer(addrs, ">u8").reshape(-1, 2)[keep],
                np.frombuffer(plens, np.uint8)[keep]]
        self._db.execute(
            "UPDATE rule_batches SET ids = ?, slots = ?, families = ?, addrs = ?, plens = ?"
            " WHERE batch = ?", (*(c.tobytes() for c in cols), batch))

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
