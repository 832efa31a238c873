"""Every rule, in columns: ~40 bytes a rule where a Rule tuple, its Prefix and the dict
entries that hold them cost ~700. A blocklist of two million rules fits in ~80 MB, and
goes in, is checked for duplicates and comes out through numpy, not a Python loop.

Rule objects (xdpfw/rules/model.py) are made on demand: for the rules an API page shows,
and for the few rules with a protocol or port, which the compiler keeps as objects.

Rows are appended in id order, so an id's row is a binary search; a deleted row stays as a
tombstone until the table compacts (when tombstones outnumber the living).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from xdpfw.dataplane.abi import ACT_DROP, ACT_PASS
from xdpfw.errors import RuleValidationError
from xdpfw.rules.model import V4, V6, Action, Prefix, Proto, Rule
from xdpfw.rules.u64map import U64Map

PROTO_CODE = {None: 0, Proto.TCP: 1, Proto.UDP: 2, Proto.ICMP: 3}
PROTO_OF = {v: k for k, v in PROTO_CODE.items()}
ACTION_CODE = {Action.PASS: ACT_PASS, Action.DROP: ACT_DROP}  # the kernel's codes
ACTION_OF = {v: k for k, v in ACTION_CODE.items()}
COLUMNS = {
    "id": np.int64, "slot": np.uint32, "family": np.uint8, "hi": np.uint64, "lo": np.uint64,
    "plen": np.uint8, "proto": np.uint8, "dport": np.uint16, "action": np.uint8,
    "comment": np.uint32, "set": np.uint16, "live": np.bool_,
}
MAX_SETS = 65_535  # set ids are 16 bits (0: no set): 2 bytes a rule


def key4(nets: np.ndarray, plens: np.ndarray, protos: np.ndarray,
         dports: np.ndarray) -> np.ndarray:
    """An IPv4 rule's match key, exact in 56 bits: net, length, protocol code, port."""
    return ((nets.astype(np.uint64) << np.uint64(24)) | (plens.astype(np.uint64) << np.uint64(18))
            | (protos.astype(np.uint64) << np.uint64(16)) | dports.astype(np.uint64))


def split(prefix: Prefix) -> tuple[int, int]:
    """(hi, lo) 64-bit halves of a prefix's network (IPv4: hi 0)."""
    return prefix.net >> 64, prefix.net & ((1 << 64) - 1)


def _masks(bits: int, drop: int) -> np.ndarray:
    """Per prefix length 0..bits: the mask of a 64-bit word's network bits, where the word
    holds address bits [drop, drop + 64) (IPv4: the low 32 bits of a word)."""
    out = []
    for length in range(bits + 1):
        net = max(0, min(64, length - drop))  # network bits that fall in this word
        width = 64 if bits == 128 else 32
        out.append(((1 << net) - 1) << (width - net) if net else 0)
    return np.array(out, dtype=np.uint64)


_MASK4 = _masks(32, 0)
_MASK6_HI, _MASK6_LO = _masks(128, 0), _masks(128, 64)


@dataclass
class Prefixes:
    """Prefixes as columns (a parsed blocklist): family, the network's 64-bit halves (IPv4:
    hi 0, lo the address), length."""

    family: np.ndarray
    hi: np.ndarray
    lo: np.ndarray
    plen: np.ndarray

    def __len__(self) -> int:
        return len(self.family)

    @classmethod
    def empty(cls) -> Prefixes:
        return cls(np.zeros(0, np.uint8), np.zeros(0, np.uint64), np.zeros(0, np.uint64),
                   np.zeros(0, np.uint8))

    @classmethod
    def of(cls, prefixes: Sequence[Prefix]) -> Prefixes:
        n = len(prefixes)
        fam = np.fromiter((p.family for p in prefixes), np.uint8, n)
        plen = np.fromiter((p.length for p in prefixes), np.uint8, n)
        if (fam == V4).all():
            return cls(fam, np.zeros(n, np.uint64),
                       np.fromiter((p.net for p in prefixes), np.uint64, n), plen)
        halves = [split(p) for p in prefixes]
        return cls(fam, np.fromiter((h for h, _ in halves), np.uint64, n),
                   np.fromiter((lo for _, lo in halves), np.uint64, n), plen)

    @classmethod
    def concat(cls, parts: Sequence[Prefixes]) -> Prefixes:
        if not parts:
            return cls.empty()
        return cls(*(np.concatenate([getattr(p, f) for p in parts])
                     for f in ("family", "hi", "lo", "plen")))

    def take(self, idx) -> Prefixes:
        return Prefixes(self.family[idx], self.hi[idx], self.lo[idx], self.plen[idx])

    def prefix(self, i: int) -> Prefix:
        fam = int(self.family[i])
        net = int(self.lo[i]) | (int(self.hi[i]) << 64 if fam == V6 else 0)
        return Prefix(fam, net, int(self.plen[i]))


class RuleTable:
    def __init__(self, capacity: int = 1024) -> None:
        self.n = 0  # rows used (living and dead)
        self.live = 0
        self._cap = max(capacity, 16)
        self.col = {name: np.zeros(self._cap, dtype=t) for name, t in COLUMNS.items()}
        self.comments: list[str] = [""]
        self._comment_id: dict[str, int] = {"": 0}
        self.sets: list[str] = [""]  # set id -> name; ids are never reused in a process
        self._set_id: dict[str, int] = {"": 0}
        self._keys4 = U64Map(capacity, np.int32)  # IPv4 match key -> row
        self._keys6: dict[tuple, int] = {}  # (hi, lo, plen, proto, dport) -> row
        self._slot_row = np.full(1024, -1, dtype=np.int32)  # counter slot -> living row

    def __len__(self) -> int:
        return self.live

    def nbytes(self) -> int:
        return (sum(a.nbytes for a in self.col.values()) + self._keys4.nbytes()
                + self._slot_row.nbytes)

    # -- adding ---------------------------------------------------------------------------

    def comment_id(self, text: str) -> int:
        cid = self._comment_id.get(text)
        if cid is None:
            cid = self._comment_id[text] = len(self.comments)
            self.comments.append(text)
        return cid

    def set_id(self, name: str) -> int:
        """The id of set `name` (made on first use; "" is 0, no set)."""
        sid = self._set_id.get(name)
        if sid is None:
            if len(self.sets) > MAX_SETS:
                raise RuleValidationError(f"no room for set {name!r}: at most {MAX_SETS} sets")
            sid = self._set_id[name] = len(self.sets)
            self.sets.append(name)
        return sid

    def find_set(self, name: str) -> int | None:
        return self._set_id.get(name)

    def append(self, *, ids: np.ndarray, slots: np.ndarray, family: np.ndarray, hi: np.ndarray,
               lo: np.ndarray, plen: np.ndarray, proto: np.ndarray, dport: np.ndarray,
               action: np.ndarray, comment: np.ndarray,
               rule_set: np.ndarray | int = 0) -> np.ndarray:
        """New rules, as columns (ids ascending, above every id already here, for
        row_of_id). Duplicates are the caller's to refuse first (find_many4). Returns their
        rows."""
        k = len(ids)
        self._reserve(self.n + k)
        rows = np.arange(self.n, self.n + k)
        for name, values in (("id", ids), ("slot", slots), ("family", family), ("hi", hi),
                             ("lo", lo), ("plen", plen), ("proto", proto), ("dport", dport),
                             ("action", action), ("comment", comment), ("set", rule_set)):
            self.col[name][rows] = values
        self.n += k
        self._enter(rows)
        return rows

    def _enter(self, rows: np.ndarray) -> None:
        """Make rows living: findable by match and by slot."""
        c = self.col
        c["live"][rows] = True
        self.live += len(rows)
        fam = c["family"][rows]
        r4 = rows[fam == V4]
        if len(r4):
            self._keys4.put_many(key4(c["lo"][r4], c["plen"][r4], c["proto"][r4],
                                      c["dport"][r4]), r4)
        for r in rows[fam != V4].tolist():
            self._keys6[self._key6(r)] = r
        slots = c["slot"][rows]
        if len(slots) and int(slots.max()) >= len(self._slot_row):
            grown = np.full(max(int(slots.max()) + 1, 2 * len(self._slot_row)), -1, np.int32)
            grown[: len(self._slot_row)] = self._slot_row
            self._slot_row = grown
        self._slot_row[slots] = rows

    def append_rules(self, rules: Sequence[Rule]) -> np.ndarray:
        """Rule objects into columns (the general path; blocklists use append)."""
        halves = [split(r.prefix) for r in rules]
        return self.append(
            ids=np.array([r.id for r in rules], dtype=np.int64),
            slots=np.array([r.slot for r in rules], dtype=np.uint32),
            family=np.array([r.prefix.family for r in rules], dtype=np.uint8),
            hi=np.array([h for h, _ in halves], dtype=np.uint64),
            lo=np.array([lo for _, lo in halves], dtype=np.uint64),
            plen=np.array([r.prefix.length for r in rules], dtype=np.uint8),
            proto=np.array([PROTO_CODE[r.proto] for r in rules], dtype=np.uint8),
            dport=np.array([r.dport or 0 for r in rules], dtype=np.uint16),
            action=np.array([ACTION_CODE[r.action] for r in rules], dtype=np.uint8),
            comment=np.array([self.comment_id(r.comment) for r in rules], dtype=np.uint32),
            rule_set=np.array([self.set_id(r.rule_set) for r in rules], dtype=np.uint16),
        )

    def reserve(self, more: int) -> None:
        """Room for `more` rows (of which IPv4: v4) in one allocation each."""
        self._reserve(self.n + more)
        self._keys4.reserve(more)

    def _reserve(self, need: int) -> None:
        if need <= self._cap:
            return
        cap = self._cap
        while cap < need:
            cap *= 2
        for name, a in self.col.items():
            grown = np.zeros(cap, dtype=a.dtype)
            grown[: self.n] = a[: self.n]
            self.col[name] = grown
        self._cap = cap

    # -- finding --------------------------------------------------------------------------

    def _key6(self, row: int) -> tuple:
        c = self.col
        return (int(c["hi"][row]), int(c["lo"][row]), int(c["plen"][row]),
                int(c["proto"][row]), int(c["dport"][row]))

    def find(self, prefix: Prefix, proto: Proto | None, dport: int | None) -> int | None:
        """The row of the rule with this match, or None."""
        hi, lo = split(prefix)
        if prefix.family == V4:
            k = (lo << 24) | (prefix.length << 18) | (PROTO_CODE[proto] << 16) | (dport or 0)
            return self._keys4.get(k)
        return self._keys6.get((hi, lo, prefix.length, PROTO_CODE[proto], dport or 0))

    def find_many(self, family: np.ndarray, hi: np.ndarray, lo: np.ndarray, plen: np.ndarray,
                  proto: np.ndarray, dport: np.ndarray) -> np.ndarray:
        """Rows of the rules with these matches (-1: none)."""
        out = np.full(len(family), -1, dtype=np.int64)
        v4 = family == V4
        if v4.any():
            out[v4] = self._keys4.get_many(key4(lo[v4], plen[v4], proto[v4], dport[v4]))
        for i in np.nonzero(~v4)[0].tolist():
            row = self._keys6.get((int(hi[i]), int(lo[i]), int(plen[i]), int(proto[i]),
                                   int(dport[i])))
            out[i] = -1 if row is None else row
        return out

    def find_many4(self, nets: np.ndarray, plens: np.ndarray) -> np.ndarray:
        """Rows of IPv4 "any protocol" rules at these prefixes (-1: none)."""
        zeros = np.zeros(len(nets), dtype=np.uint8)
        return self._keys4.get_many(key4(nets, plens, zeros, zeros.astype(np.uint16)))

    def row_of_id(self, rule_id: int) -> int | None:
        ids = self.col["id"][: self.n]
        row = int(np.searchsorted(ids, rule_id))
        if row < self.n and ids[row] == rule_id and self.col["live"][row]:
            return row
        return None

    def row_of_slot(self, slot: int) -> int | None:
        table = self._slot_row
        row = int(table[slot]) if 0 <= slot < len(table) else -1
        return row if row >= 0 else None

    def rows_of_slots(self, slots: np.ndarray) -> np.ndarray:
        """Living rows of these counter slots (-1: none)."""
        table = self._slot_row
        slots = np.asarray(slots, dtype=np.int64)
        out = np.full(len(slots), -1, dtype=np.int64)
        ok = slots < len(table)
        out[ok] = table[slots[ok]]
        return out

    def rule(self, row: int) -> Rule:
        c = self.col
        fam = int(c["family"][row])
        net = (int(c["hi"][row]) << 64) | int(c["lo"][row]) if fam == V6 else int(c["lo"][row])
        dport = int(c["dport"][row])
        return Rule(int(c["id"][row]), Prefix(fam, net, int(c["plen"][row])),
                    ACTION_OF[int(c["action"][row])], PROTO_OF[int(c["proto"][row])],
                    dport or None, self.comments[int(c["comment"][row])], int(c["slot"][row]),
                    self.sets[int(c["set"][row])])

    def rows(self) -> np.ndarray:
        """Every living row, in id order."""
        return np.nonzero(self.col["live"][: self.n])[0]

    def any_rows(self) -> np.ndarray:
        """Living rows of "any protocol" rules (one per prefix)."""
        n = self.n
        return np.nonzero(self.col["live"][:n] & (self.col["proto"][:n] == 0))[0]

    def port_rows(self) -> np.ndarray:
        """Living rows of rules with a protocol (and maybe a port)."""
        n = self.n
        return np.nonzero(self.col["live"][:n] & (self.col["proto"][:n] != 0))[0]

    def iter_rules(self, rows: np.ndarray | None = None) -> Iterator[Rule]:
        for r in (self.rows() if rows is None else rows).tolist():
            yield self.rule(r)

    def column(self, name: str, rows: np.ndarray | None = None) -> np.ndarray:
        return self.col[name][self.rows() if rows is None else rows]

    def max_id(self) -> int:
        rows = self.rows()
        return int(self.col["id"][rows[-1]]) if len(rows) else 0

    def action_counts(self) -> dict[Action, int]:
        counts = np.bincount(self.column("action"), minlength=3)
        return {a: int(counts[code]) for a, code in ACTION_CODE.items()}

    def select(self, action: Action | None = None, proto: Proto | None = None,
               prefix: Prefix | None = None, comment: str | None = None,
               rule_set: str | None = None, covering: Prefix | None = None) -> np.ndarray:
        """Living rows that match every filter given, in id order (comment: a substring;
        rule_set: exact, "" for rules in no set; covering: an address, the rules whose
        prefix contains it, in the order they decide: longest prefix, then most specific)."""
        n, c = self.n, self.col
        keep = c["live"][:n].copy()
        if rule_set is not None:
            sid = self._set_id.get(rule_set)
            if sid is None:
                return np.zeros(0, dtype=np.int64)
            keep &= c["set"][:n] == sid
        if covering is not None:
            keep &= self._covering(covering)
        if action is not None:
            keep &= c["action"][:n] == ACTION_CODE[action]
        if proto is not None:
            keep &= c["proto"][:n] == PROTO_CODE[proto]
        if prefix is not None:
            hi, lo = split(prefix)
            keep &= ((c["family"][:n] == prefix.family) & (c["plen"][:n] == prefix.length)
                     & (c["lo"][:n] == np.uint64(lo)) & (c["hi"][:n] == np.uint64(hi)))
        if comment is not None:
            ids = [i for i, text in enumerate(self.comments) if comment in text]
            keep &= np.isin(c["comment"][:n], np.array(ids, dtype=np.uint32))
        rows = np.nonzero(keep)[0]
        if covering is not None:  # the deciding order: longest prefix, then most specific
            rows = rows[np.lexsort((c["id"][rows], c["dport"][rows] == 0,
                                    c["proto"][rows] == 0, -c["plen"][rows].astype(np.int16)))]
        return rows

    def _covering(self, addr: Prefix) -> np.ndarray:
        """Over rows [0, n): does the row's prefix contain `addr` (an address, or all of a
        prefix)?"""
        n, c = self.n, self.col
        hi, lo = split(addr)
        plen = np.minimum(c["plen"][:n], addr.length)  # longer ones cannot contain it
        if addr.family == V4:
            inside = ((c["lo"][:n] ^ np.uint64(lo)) & _MASK4[np.minimum(plen, 32)]) == 0
        else:
            inside = ((((c["hi"][:n] ^ np.uint64(hi)) & _MASK6_HI[plen]) == 0)
                      & (((c["lo"][:n] ^ np.uint64(lo)) & _MASK6_LO[plen]) == 0))
        return inside & (c["family"][:n] == addr.family) & (c["plen"][:n] <= addr.length)

    def rows_of_set(self, name: str) -> np.ndarray:
        """Living rows of set `name`, in id order (none when there is no such set)."""
        sid = self._set_id.get(name)
        if sid is None:
            return np.zeros(0, dtype=np.int64)
        n = self.n
        return np.nonzero(self.col["live"][:n] & (self.col["set"][:n] == sid))[0]

    def rows_with_comment(self, text: str) -> np.ndarray:
        """Living rows whose comment is exactly `text`, in id order."""
        cid = self._comment_id.get(text)
        if cid is None:
            return np.zeros(0, dtype=np.int64)
        n = self.n
        return np.nonzero(self.col["live"][:n] & (self.col["comment"][:n] == cid))[0]

    def set_sizes(self) -> dict[str, int]:
        """Rules per named set, for the sets that have any."""
        counts = np.bincount(self.column("set"), minlength=len(self.sets))
        return {self.sets[i]: int(k) for i, k in enumerate(counts.tolist()) if k and i}

    # -- removing -------------------------------------------------------------------------

    def delete(self, rows: Sequence[int] | np.ndarray) -> None:
        """Rows stop living (revive() undoes it until compact_if_sparse runs)."""
        rows = np.asarray(rows, dtype=np.int64)
        c = self.col
        v4 = c["family"][rows] == V4
        r4 = rows[v4]
        self._keys4.pop_many(key4(c["lo"][r4], c["plen"][r4], c["proto"][r4], c["dport"][r4]))
        for r in rows[~v4].tolist():
            self._keys6.pop(self._key6(r), None)
        self._slot_row[c["slot"][rows]] = -1
        c["live"][rows] = False
        self.live -= len(rows)

    def revive(self, rows: Sequence[int] | np.ndarray) -> None:
        self._enter(np.asarray(rows, dtype=np.int64))

    def truncate(self, n: int) -> None:
        """Forget rows from n on (all dead: a failed add's, deleted again)."""
        if self.col["live"][n: self.n].any():
            raise ValueError("truncate would drop living rows")
        for a in self.col.values():
            a[n: self.n] = 0
        self.n = n

    def compact_if_sparse(self) -> None:
        """Drop the tombstones once they outnumber the living (rows renumber; ids keep their
        order). Readers that hold no lock see the old arrays or the new ones, never a mix."""
        if self.n <= 1024 or self.live * 2 >= self.n:
            return
        keep = self.rows()
        col = {name: np.zeros(max(len(keep), 16), dtype=a.dtype) for name, a in self.col.items()}
        for name, a in self.col.items():
            col[name][: len(keep)] = a[keep]
        n = len(keep)
        c = col
        rows = np.arange(n)
        v4 = c["family"][:n] == V4
        keys4 = U64Map(n, np.int32)
        keys4.put_many(key4(c["lo"][rows[v4]], c["plen"][rows[v4]], c["proto"][rows[v4]],
                            c["dport"][rows[v4]]), rows[v4])
        slot_row = np.full(len(self._slot_row), -1, dtype=np.int32)
        slot_row[c["slot"][:n]] = rows
        self.col, self._cap, self.n = col, len(col["id"]), n
        self._keys4, self._slot_row = keys4, slot_row
        self._keys6 = {self._key6(r): r for r in rows[~v4].tolist()}


@dataclass
class NewRules:
    """Rules to add, as columns (no ids or counter slots yet)."""

    prefixes: Prefixes
    proto: np.ndarray  # PROTO_CODE
    dport: np.ndarray
    action: np.ndarray  # ACTION_CODE
    comment: np.ndarray  # RuleTable.comment_id
    rule_set: np.ndarray  # RuleTable.set_id

    def __len__(self) -> int:
        return len(self.prefixes)

    @classmethod
    def plain(cls, prefixes: Prefixes, action: Action, comment_id: int,
              set_id: int = 0) -> NewRules:
        """A blocklist: every prefix with one action, comment and set, any protocol."""
        def same(value, dtype) -> np.ndarray:  # one value seen n times: no memory per rule
            return np.broadcast_to(np.array(value, dtype=dtype), (len(prefixes),))

        return cls(prefixes, same(0, np.uint8), same(0, np.uint16),
                   same(ACTION_CODE[action], np.uint8), same(comment_id, np.uint32),
                   same(set_id, np.uint16))

    @classmethod
    def of(cls, specs: Sequence, table: RuleTable) -> NewRules:
        """From (prefix, action, proto, dport, comment, set) tuples (service.RuleSpec)."""
        n = len(specs)
        return cls(
            Prefixes.of([s[0] for s in specs]),
            np.fromiter((PROTO_CODE[s[2]] for s in specs), np.uint8, n),
            np.fromiter((s[3] or 0 for s in specs), np.uint16, n),
            np.fromiter((ACTION_CODE[s[1]] for s in specs), np.uint8, n),
            np.fromiter((table.comment_id(s[4]) for s in specs), np.uint32, n),
            np.fromiter((table.set_id(s[5]) for s in specs), np.uint16, n),
        )

    @classmethod
    def concat(cls, parts: Sequence[NewRules]) -> NewRules:
        if len(parts) == 1:
            return parts[0]
        return cls(Prefixes.concat([p.prefixes for p in parts]),
                   *(np.concatenate([getattr(p, f) for p in parts])
                     for f in ("proto", "dport", "action", "comment", "rule_set")))

    def take(self, idx) -> NewRules:
        return NewRules(self.prefixes.take(idx), self.proto[idx], self.dport[idx],
                        self.action[idx], self.comment[idx], self.rule_set[idx])

    def columns(self, part: slice | np.ndarray) -> dict[str, np.ndarray]:
        """RuleTable.append's columns (but ids and slots) of rows `part`."""
        p = self.prefixes
        return {"family": p.family[part], "hi": p.hi[part], "lo": p.lo[part],
                "plen": p.plen[part], "proto": self.proto[part], "dport": self.dport[part],
                "action": self.action[part], "comment": self.comment[part],
                "rule_set": self.rule_set[part]}

    def describe(self, i: int) -> str:
        """Row i's match, as error messages name it."""
        parts = [str(self.prefixes.prefix(i))]
        proto = PROTO_OF[int(self.proto[i])]
        if proto:
            parts.append(proto.value)
        if self.dport[i]:
            parts.append(f"port {int(self.dport[i])}")
        return " ".join(parts)

    def first_repeat(self) -> int | None:
        """The first row whose match an earlier row of these has too, or None."""
        p = self.prefixes
        v4 = np.nonzero(p.family == V4)[0]
        repeats = []
        if len(v4):
            keys = key4(p.lo[v4], p.plen[v4], self.proto[v4], self.dport[v4])
            ordered = np.sort(keys)
            if (ordered[1:] == ordered[:-1]).any():  # the rare case pays for finding it
                del ordered
                _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
                again = np.nonzero(first[inverse] != np.arange(len(v4)))[0]
                repeats.append(int(v4[again[0]]))
        seen: set[tuple] = set()
        for i in np.nonzero(p.family != V4)[0].tolist():
            key = (int(p.hi[i]), int(p.lo[i]), int(p.plen[i]), int(self.proto[i]),
                   int(self.dport[i]))
            if key in seen:
                repeats.append(i)
                break
            seen.add(key)
        return min(repeats) if repeats else None
