"""Compile rules into the data plane's map entries, incrementally. Pure Python: no BCC.

Semantics (the same a person reads off the rule list):
  among the rules whose prefix contains the source address and whose proto/port match,
  the one with the longest prefix wins; on a tie, the most specific match
  (proto+port, then proto, then any) wins.

The kernel does one LPM lookup, and a second one only when the matched prefix has port rules.
So each LPM entry carries a *resolved* verdict:
  - a prefix with an "any" rule needs nothing from its ancestors: any packet that reaches it
    is decided there, at the longest matching prefix;
  - a prefix with only proto/port rules ("port-only") inherits: the nearest ancestor's "any"
    rule, and the port rules of ancestors up to that one.
Hence a change at prefix P affects P itself and the port-only prefixes inside P, and nothing
else: adding one rule to a million costs a handful of dictionary lookups.

Packets whose headers cannot be read to the end (README: "incomplete") get the *strictest*
verdict a readable packet of the same source could get: drop if the prefix's fallback or any
entry of its port table drops; else the fallback (ACT_NONE: the interface policy). For a
prefix without a port table that is its own verdict; a port table carries it in one more
entry, STRICT (kind XDPFW_PORT_STRICT in the kernel, which no packet's key can name).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from itertools import repeat

import numpy as np

from xdpfw.dataplane.abi import (
    ACT_DROP,
    ACT_NONE,
    NO_PORT_SET,
    NO_RULE,
    PV_ACT_SHIFT,
    PV_SLOT_MASK,
)
from xdpfw.dataplane.v4table import pack_verdict
from xdpfw.rules.model import V4, Prefix, Rule, ip_proto
from xdpfw.rules.table import ACTION_CODE, RuleTable

QUARANTINE_S = 1.0  # as xdpfw/dataplane/v4table.py: ids are reused only after packets drain

PortMatch = tuple[int, int]  # (ip proto, dport); dport 0: any port of that proto
Verdict = tuple[int, int]  # (rule slot, action code)
PrefixValue = tuple[int, int, int]  # (rule slot, action code, port set)
PortKey = tuple[int, int, int]  # (port set, ip proto, dport)
STRICT: PortMatch = (-1, 0)  # the port table's strictest verdict (see the module docstring)


@dataclass
class Changes:
    """Map writes that take the data plane from the previous compiled state to the new one."""

    prefixes: dict[Prefix, PrefixValue] = field(default_factory=dict)
    deleted_prefixes: list[Prefix] = field(default_factory=list)
    ports: dict[PortKey, Verdict] = field(default_factory=dict)
    deleted_ports: list[PortKey] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.prefixes or self.deleted_prefixes or self.ports or self.deleted_ports)


def _verdict(rule: Rule) -> Verdict:
    return (rule.slot, ACTION_CODE[rule.action])


def strictest(fallback: Verdict | None, table: dict[PortMatch, Verdict]) -> Verdict:
    """Drop if the fallback or any entry drops (the fallback's rule first, then the lowest
    match, so the counted rule is stable); else the fallback, or (NO_RULE, ACT_NONE) when the
    interface policy is the fallback."""
    if fallback is not None and fallback[1] == ACT_DROP:
        return fallback
    drops = [table[m] for m in sorted(table) if m != STRICT and table[m][1] == ACT_DROP]
    if drops:
        return drops[0]
    return fallback if fallback is not None else (NO_RULE, ACT_NONE)


def all_plain(rules: list[Rule]) -> bool:
    """No rule narrows by protocol (and so none by port)."""
    return not any(r.proto is not None for r in rules)


def port_match(rule: Rule) -> PortMatch | None:
    if rule.proto is None:
        return None
    return (ip_proto(rule.proto, rule.prefix.family), rule.dport or 0)


class AnyRules:
    """The "any protocol" rule of each prefix, read from the rule table (a dict-like view)."""

    def __init__(self, table: RuleTable) -> None:
        self._table = table

    def get(self, prefix: Prefix) -> Rule | None:
        row = self._table.find(prefix, None, None)
        return None if row is None else self._table.rule(row)

    def __contains__(self, prefix: Prefix) -> bool:
        return self._table.find(prefix, None, None) is not None

    def __getitem__(self, prefix: Prefix) -> Rule:
        rule = self.get(prefix)
        if rule is None:
            raise KeyError(prefix)
        return rule


class PrefixValues(Mapping):
    """What the maps hold for each prefix (a read-only view): a prefix touched by proto/port
    rules has its compiled value in RuleIndex.complex; any other prefix with an "any" rule
    holds that rule's own verdict, which is not stored twice."""

    def __init__(self, index: RuleIndex) -> None:
        self._index = index

    def __getitem__(self, prefix: Prefix) -> PrefixValue:
        value = self._index.complex.get(prefix)
        if value is not None:
            return value
        rule = self._index.any_rules.get(prefix)
        if rule is None:
            raise KeyError(prefix)
        return (rule.slot, ACTION_CODE[rule.action], NO_PORT_SET)

    def __contains__(self, prefix: object) -> bool:
        return prefix in self._index.complex or prefix in self._index.any_rules

    def __iter__(self) -> Iterator[Prefix]:
        idx = self._index
        yield from idx.complex
        for r in idx.table.iter_rules(idx.table.any_rows()):
            if r.prefix not in idx.complex:
                yield r.prefix

    def __len__(self) -> int:
        idx = self._index
        return len(idx.table.any_rows()) + len(idx.port_only)

    def items(self) -> list[tuple[Prefix, PrefixValue]]:  # type: ignore[override]
        """Every (prefix, value), without a lookup per prefix."""
        idx = self._index
        out = list(idx.complex.items())
        for r in idx.table.iter_rules(idx.table.any_rows()):
            if r.prefix not in idx.complex:
                out.append((r.prefix, (r.slot, ACTION_CODE[r.action], NO_PORT_SET)))
        return out


class RuleIndex:
    """The rules (a RuleTable, the truth in memory), and what is compiled into the maps.

    Plain prefix rules (the bulk of any blocklist) live only as rows of the table and
    compile to their own verdict; only prefixes with proto/port rules, and the port-only
    prefixes that inherit from them, take the general path and keep a compiled value.
    """

    def __init__(self, port_set_base: int = 0, table: RuleTable | None = None) -> None:
        """port_set_base: port set ids are numbered from base + 1 (the data plane keeps two
        halves of ids; a start compiles into the half the running layout does not use)."""
        self.table = table if table is not None else RuleTable()
        self.any_rules = AnyRules(self.table)
        self.port_rules: dict[Prefix, dict[PortMatch, Rule]] = {}
        self.port_only: set[Prefix] = set()  # prefixes with port rules and no "any" rule
        # Compiled state: what the maps hold now, where it is not the prefix's own rule.
        self.complex: dict[Prefix, PrefixValue] = {}
        self.prefix_values = PrefixValues(self)
        self.port_entries: dict[Prefix, dict[PortMatch, Verdict]] = {}
        self.port_set_ids: dict[Prefix, int] = {}
        self._free_sets: list[int] = []
        self._next_set = port_set_base + 1
        self._freed: list[int] = []
        # Freed set ids wait QUARANTINE_S: a packet that read a prefix's old verdict must not
        # find the set's next owner's entries under the same id.
        self._waiting: deque[tuple[float, int]] = deque()
        self.port_entry_count = 0  # entries of port_rules, STRICT ones included

    def __len__(self) -> int:
        return len(self.table)

    def find(self, prefix: Prefix, proto, dport) -> Rule | None:
        if proto is None:
            return self.any_rules.get(prefix)
        table = self.port_rules.get(prefix)
        return table.get((ip_proto(proto, prefix.family), dport or 0)) if table else None

    # -- mutation ---------------------------------------------------------------------------

    def plain_only(self) -> bool:
        """No port rule anywhere: a plain prefix rule then compiles to exactly its own
        verdict, (slot, action, NO_PORT_SET), and touches no other entry."""
        return not self.port_rules and not self.port_entries

    def add(self, rules: Iterable[Rule], report: bool = True) -> Changes:
        """Add `rules` to the table and compile what they change. report=False: the caller
        writes plain rules from its own columns (only valid while plain_only()), so the
        Changes come back empty."""
        rules = rules if isinstance(rules, list) else list(rules)
        self.table.append_rules(rules)
        return self.compile_added(rules, report)

    def add_columns(self, **columns) -> None:
        """Plain rules as columns (RuleTable.append's) into a plain-only index: nothing to
        compile, each entry is its rule's own verdict, and the caller writes the maps."""
        if not self.plain_only():
            raise ValueError("add_columns is for plain rules into a plain-only index")
        self.table.append(**columns)

    def compile_added(self, rules: list[Rule], report: bool = True) -> Changes:
        """Compile rules already in the table."""
        if self.plain_only() and all_plain(rules):
            return self._plain_changes(rules) if report else Changes()
        if not report:
            raise ValueError("report=False is only for plain rules into a plain-only index")
        return self.recompile(self.enter(rules), set())

    def enter(self, rules: list[Rule]) -> list[Prefix]:
        """Rules already in the table join the port bookkeeping; returns the prefixes to
        recompile."""
        touched: list[Prefix] = []
        port_only = self.port_only
        for rule in rules:
            p = rule.prefix
            if rule.proto is None:
                port_only.discard(p)
            else:
                table = self.port_rules.get(p)
                if table is None:
                    table = self.port_rules[p] = {}
                table[port_match(rule)] = rule
                if p not in self.any_rules:
                    port_only.add(p)
            touched.append(p)
        return touched

    def _plain_changes(self, rules: list[Rule]) -> Changes:
        """Plain rules into a plain-only index: each entry is its rule's own verdict."""
        codes = map(ACTION_CODE.__getitem__, [r.action for r in rules])
        verdicts = zip([r.slot for r in rules], codes, repeat(NO_PORT_SET), strict=False)
        return Changes(prefixes=dict(zip([r.prefix for r in rules], verdicts, strict=True)))

    def remove(self, rules: Iterable[Rule]) -> Changes:
        rows = [self.table.find(r.prefix, r.proto, r.dport) for r in rules]
        return self.remove_rows(np.array([r for r in rows if r is not None], dtype=np.int64))

    def remove_rows(self, rows: np.ndarray) -> Changes:
        """Rules leave (their rows stay as tombstones: revive_rows undoes this)."""
        return self.recompile(*self.forget(rows))

    def forget(self, rows: np.ndarray) -> tuple[list[Prefix], set[Prefix]]:
        """Rules leave the table (tombstones) and the port bookkeeping, uncompiled yet:
        returns recompile's arguments, to which `enter` may add before compiling once."""
        rules = list(self.table.iter_rules(rows))
        self.table.delete(rows)
        touched: list[Prefix] = []
        dropped_any: set[Prefix] = set()
        for rule in rules:
            p = rule.prefix
            if rule.proto is None:
                dropped_any.add(p)
                if p in self.port_rules:
                    self.port_only.add(p)
            else:
                table = self.port_rules[p]
                del table[port_match(rule)]
                if not table:
                    del self.port_rules[p]
                    self.port_only.discard(p)
            touched.append(p)
        return touched, dropped_any

    def revive_rows(self, rows: np.ndarray) -> Changes:
        """Undo remove_rows (a delete whose commit failed)."""
        self.table.revive(rows)
        return self.compile_added(list(self.table.iter_rules(rows)))

    # -- what the maps hold ------------------------------------------------------------------

    def entries_v4(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every IPv4 entry as columns: (nets, lengths, packed verdicts), from the table's
        columns for plain prefixes (a blocklist of millions builds no object here)."""
        t, c = self.table, self.table.col
        rows = t.any_rows()
        rows = rows[c["family"][rows] == V4]
        cx = [(p, v) for p, v in self.complex.items() if p.family == V4]
        if cx:
            nets = np.array([p.net for p, _ in cx], dtype=np.uint64)
            plens = np.array([p.length for p, _ in cx], dtype=np.uint8)
            rows = rows[~np.isin(rows, t.find_many4(nets, plens))]
        packed = ((c["slot"][rows].astype(np.uint64) & np.uint64(PV_SLOT_MASK))
                  | (c["action"][rows].astype(np.uint64) << np.uint64(PV_ACT_SHIFT)))
        extra = np.array([pack_verdict(*v) for _, v in cx], dtype=np.uint64)
        return (np.concatenate([c["lo"][rows].astype(np.uint32),
                                np.array([p.net for p, _ in cx], dtype=np.uint32)]),
                np.concatenate([c["plen"][rows],
                                np.array([p.length for p, _ in cx], dtype=np.uint8)]),
                np.concatenate([packed, extra]))

    def entries_v6(self) -> dict[Prefix, PrefixValue]:
        t = self.table
        rows = t.any_rows()
        rows = rows[t.col["family"][rows] != V4]
        out = {r.prefix: (r.slot, ACTION_CODE[r.action], NO_PORT_SET)
               for r in t.iter_rules(rows)}
        out.update((p, v) for p, v in self.complex.items() if p.family != V4)
        return out

    # -- compilation ------------------------------------------------------------------------

    def parent_of(self, prefix: Prefix) -> Prefix | None:
        """The longest prefix shorter than `prefix` that covers it and has an entry."""
        return next((q for q in prefix.parent_candidates() if q in self.prefix_values), None)

    def _affected(self, touched: list[Prefix]) -> Iterable[Prefix]:
        """Each touched prefix once (a change of several rules on one prefix touches it once
        per rule), and the port-only prefixes inside them."""
        if not self.port_only:
            return dict.fromkeys(touched)
        affected = set(touched)
        for p in touched:
            affected.update(q for q in self.port_only if p.contains(q))
        return affected

    def _chain(self, prefix: Prefix) -> list[Prefix]:
        """The prefixes whose rules can decide for packets that land on `prefix`, longest
        first: up to and including the nearest one with an "any" rule."""
        chain = [prefix]
        if prefix not in self.any_rules:
            for parent in prefix.parent_candidates():
                if parent in self.any_rules:
                    chain.append(parent)
                    break
                if parent in self.port_rules:
                    chain.append(parent)
        return chain

    def resolve(self, prefix: Prefix) -> tuple[Verdict | None, dict[PortMatch, Verdict]]:
        """The fallback verdict of `prefix` and its port table, per the semantics above."""
        chain = self._chain(prefix)
        anys = [self.any_rules.get(q) for q in chain]
        ports = [self.port_rules.get(q, {}) for q in chain]
        fallback = next((a for a in anys if a is not None), None)
        keys: set[PortMatch] = set()
        for table in ports:
            keys.update(table)
        result: dict[PortMatch, Verdict] = {}
        for proto, dport in keys:
            winner = None
            for any_rule, table in zip(anys, ports, strict=True):
                winner = (
                    table.get((proto, dport)) or (dport and table.get((proto, 0))) or any_rule
                )
                if winner is not None:
                    break
            # Omitted entries fall through to the same fallback in the kernel.
            if winner is not None and winner is not fallback:
                result[(proto, dport)] = _verdict(winner)
        base = _verdict(fallback) if fallback else None
        if result:
            result[STRICT] = strictest(base, result)
        return base, result

    def recompile(self, touched: Iterable[Prefix], dropped_any: set[Prefix]) -> Changes:
        """dropped_any: prefixes whose "any" rule this change removed (so they had an entry
        even when nothing compiled was kept for them)."""
        changes = Changes()
        out = changes.prefixes
        complex_ = self.complex
        port_rules, port_entries = self.port_rules, self.port_entries
        self._freed = []
        for prefix in self._affected(touched):
            rule = self.any_rules.get(prefix)
            if prefix not in port_rules and prefix not in port_entries:
                had = complex_.pop(prefix, None) is not None or prefix in dropped_any
                if rule is not None:  # a plain prefix rule: its own verdict
                    out[prefix] = (rule.slot, ACTION_CODE[rule.action], NO_PORT_SET)
                elif had:
                    changes.deleted_prefixes.append(prefix)
                continue
            if rule is None and prefix not in port_rules:  # its port rules just went
                if complex_.pop(prefix, None) is not None or prefix in dropped_any:
                    changes.deleted_prefixes.append(prefix)
                self._set_ports(prefix, {}, changes)
                continue
            fallback, table = self.resolve(prefix)
            port_set = self._set_ports(prefix, table, changes)
            slot, action = fallback if fallback else (NO_RULE, ACT_NONE)
            value = (slot, action, port_set)
            if prefix not in port_rules and prefix not in port_entries:
                # Its last port rule went: a plain prefix again, its own rule's verdict, and
                # out of `complex` (which holds only what is not a prefix's own rule: the
                # plain paths of the table read and write the rest from columns).
                if complex_.pop(prefix, None) != value:
                    out[prefix] = value
                continue
            if complex_.get(prefix) != value:
                complex_[prefix] = value
                out[prefix] = value
        # Freed only now, and reusable only after the quarantine (see __init__).
        now = time.monotonic()
        self._waiting.extend((now, i) for i in self._freed)
        return changes

    def _set_ports(self, prefix: Prefix, table: dict[PortMatch, Verdict], ch: Changes) -> int:
        old = self.port_entries.get(prefix, {})
        if not table and not old:
            return NO_PORT_SET
        set_id = self.port_set_ids.get(prefix)
        if set_id is None:
            now = time.monotonic()
            while self._waiting and now - self._waiting[0][0] >= QUARANTINE_S:
                self._free_sets.append(self._waiting.popleft()[1])
            set_id = self._free_sets.pop() if self._free_sets else self._next_set
            if set_id == self._next_set:
                self._next_set += 1
            self.port_set_ids[prefix] = set_id
        for pm, verdict in table.items():
            if old.get(pm) != verdict:
                ch.ports[(set_id, *pm)] = verdict
        ch.deleted_ports.extend((set_id, *pm) for pm in old if pm not in table)
        self.port_entry_count += len(table) - len(old)
        if table:
            self.port_entries[prefix] = dict(table)
            return set_id
        del self.port_entries[prefix]
        del self.port_set_ids[prefix]
        self._freed.append(set_id)
        return NO_PORT_SET
