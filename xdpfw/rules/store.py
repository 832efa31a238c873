"""SQLite persistence of rules and interface attachments.

The service writes inside `transaction()` and commits before the API answers, so an
acknowledged rule survives a crash; start-up loads everything back into the maps.
"""

from __future__ import annotations

import itertools
import operator
import secrets
import sys
import time
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from xdpfw.db import SqliteDb
from xdpfw.rules.model import V4, V6, Action, Prefix, Proto, Rule

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
    created REAL NOT NULL
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
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS deleted_batch_rules (id INTEGER PRIMARY KEY);
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


def _addrs16(prefixes: list[Prefix]) -> bytes:
    """Every address as 16 big-endian bytes (IPv4 right-aligned, as int.to_bytes(16) gives)."""
    if V6 in set(map(_FAMILY, prefixes)):
        return b"".join([p.net.to_bytes(16, "big") for p in prefixes])
    words = array("I", bytes(16 * len(prefixes)))
    nets = array("I", map(_NET, prefixes))
    if sys.byteorder == "little":
        nets.byteswap()
    words[3::4] = nets
    return words.tobytes()

@dataclass(frozen=True)
class InterfaceRecord:
    name: str
    netns: str | None
    mode: str  # as requested: auto, native, generic, offload
    policy: str
    unparsed_policy: str
    guard_l2: bool
    slot: int



class Store(SqliteDb):
    def __init__(self, path: Path | str) -> None:
        super().__init__(path, SCHEMA)

    # -- rules ----------------------------------------------------------------------------

    def load_rules(self) -> list[Rule]:
        rules = self._load_rows() + self._load_batches()
        rules.sort(key=lambda r: r.id)
        return rules

    def _load_batches(self) -> list[Rule]:
        deleted = {i for (i,) in self._db.execute("SELECT id FROM deleted_batch_rules")}
        out: list[Rule] = []
        frm = int.from_bytes
        for ids, slots, fams, addrs, plens, proto, dport, act, comment in self._db.execute(
            "SELECT ids, slots, families, addrs, plens, proto, dport, action, comment"
            " FROM rule_batches ORDER BY batch"
        ):
            action, pr, dp = ACTIONS[act], PROTOS[proto], dport or None
            id_list, slot_list = array("Q", ids), array("I", slots)
            for i, rid in enumerate(id_list):
                if rid in deleted:
                    continue
                prefix = Prefix(fams[i], frm(addrs[16 * i : 16 * i + 16], "big"), plens[i])
                out.append(Rule(rid, prefix, action, pr, dp, comment, slot_list[i]))
        return out

    def _load_rows(self) -> list[Rule]:
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
        """Small requests get a row per rule; large ones a batch row per (action, match,
        comment) group."""
        if not rules:
            return
        if len(rules) < BATCH_MIN:
            self._insert_rows(rules)
        else:
            first = rules[0]
            kind0 = (first.action, first.proto, first.dport, first.comment)
            # A blocklist shares one kind: check that without building a tuple per rule.
            if all(map(kind0.__eq__, map(operator.itemgetter(2, 3, 4, 5), rules))):
                kinds = {kind0}
            else:
                kinds = {(r.action, r.proto, r.dport, r.comment) for r in rules}
            for kind in kinds:
                members = rules if len(kinds) == 1 else [r for r in rules if r[2:6] == kind]
                self._insert_batch(members, *kind)
        self._db.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES ('last_rule_id', ?)",
            (max(self.last_rule_id(), rules[0].id, rules[-1].id),),  # ids ascend
        )

    def _insert_batch(self, rules: list[Rule], action, proto, dport, comment) -> None:
        prefixes = list(map(_PREFIX, rules))
        self._db.execute(
            "INSERT INTO rule_batches (ids, slots, families, addrs, plens, proto, dport,"
            " action, comment, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                array("Q", map(_ID, rules)).tobytes(),
                array("I", map(_SLOT, rules)).tobytes(),
                bytes(map(_FAMILY, prefixes)),
                _addrs16(prefixes),
                bytes(map(_LENGTH, prefixes)),
                proto.value if proto else "",
                dport or 0,
                action.value,
                comment,
                time.time(),
            ),
        )

    def _insert_rows(self, rules: Sequence[Rule]) -> None:
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
        for i in ids:
            if self._db.execute("DELETE FROM rules WHERE id = ?", (i,)).rowcount == 0:
                # Not a row of its own: it belongs to a batch.
                self._db.execute("INSERT OR IGNORE INTO deleted_batch_rules (id) VALUES (?)", (i,))

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
