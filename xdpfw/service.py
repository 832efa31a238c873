"""The firewall service: the one place that changes rules and attachments.

Every change goes: validate -> compile -> open a DB transaction -> write the maps -> commit.
If a map write fails, the transaction rolls back and the maps are put back, so a request
either takes full effect and is on disk, or changes nothing.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
import time
from collections.abc import Sequence
from concurrent import futures
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import NamedTuple

import numpy as np

from xdpfw import heap
from xdpfw.audit import AuditLog
from xdpfw.dataplane import abi
from xdpfw.dataplane.attach import Mode, link_info, where
from xdpfw.dataplane.dataplane import Build, Dataplane, LinkState, Upgrade
from xdpfw.dataplane.loader import LoadedProgram, ProgramConfig
from xdpfw.dataplane.maps import FirewallMaps
from xdpfw.dataplane.progs import ProgInfo
from xdpfw.dataplane.testrun import XDP_DROP
from xdpfw.errors import (
    ConflictError,
    MapFullError,
    NotFoundError,
    PinOwnerError,
)
from xdpfw.explain import Explanation, Probe
from xdpfw.gcpause import gc_paused
from xdpfw.rules import document
from xdpfw.rules.compile import Changes, RuleIndex
from xdpfw.rules.diff import RuleDiff, diff_rules
from xdpfw.rules.document import Export, RuleDocument
from xdpfw.rules.model import (
    ADDR_BITS,
    V4,
    Action,
    Prefix,
    Proto,
    Rule,
    check_match,
    check_set_name,
)
from xdpfw.rules.store import InterfaceRecord, Store
from xdpfw.rules.table import ACTION_OF, NewRules, Prefixes, RuleTable, sorted_unique
from xdpfw.slots import SlotAllocator
from xdpfw.statedir import store_path

log = logging.getLogger(__name__)

ADD_CHUNK = 1 << 18  # rules compiled and written at a time (writes overlap the next chunk)
RELAYOUT_GAP_S = 1.0  # as V4Table waits before reusing freed ids: packets in flight are done
# A compiled change costs ~9 us a rule (in or out), a relayout ~0.9 us a rule kept: a change
# of at least RELAYOUT_MIN rules, and a tenth of what stays, is laid out again instead.
RELAYOUT_MIN, COMPILED_PER_RELAYOUT = 10_000, 10

POLICY_CODE = {"pass": abi.POLICY_PASS, "drop": abi.POLICY_DROP}


class RuleSpec(NamedTuple):
    """A rule that has no id or counter slot yet; add_rules validates its match."""

    prefix: Prefix
    action: Action
    proto: Proto | None = None
    dport: int | None = None
    comment: str = ""
    rule_set: str = ""


@dataclass(frozen=True)
class SyncReport:
    """What making a group of rules (a set, or every rule) equal to a list did, or would do
    (dry run). ids: the rules that entered (added and changed), ascending."""

    added: int
    removed: int
    kept: int
    changed: int
    ids: range
    examples: dict[str, list[str]]  # added / removed / changed: the first few, described
    dry_run: bool = False


EXAMPLES = 20  # rules of each kind a SyncReport names


@dataclass(frozen=True)
class Attachment:
    record: InterfaceRecord
    ifindex: int
    mode_in_use: Mode


class Counts(NamedTuple):
    rules: int
    interfaces: int


def _check_specs(specs: Sequence[RuleSpec]) -> None:
    """What a RuleSpec's fields alone can be refused for: a port without its protocol, a
    bad set name."""
    for s in specs:
        if s.proto is not None or s.dport is not None:
            check_match(s.proto, s.dport)
        if s.rule_set:
            check_set_name(s.rule_set)


class Firewall:
    def __init__(
        self,
        state_dir: Path | str,
        dataplane: Dataplane | ProgramConfig,
        adopt_pins: bool = False,
    ) -> None:
        """dataplane: the daemon's Dataplane, or a ProgramConfig to load one of its own (closed
        with the firewall). adopt_pins: pins claimed by another store are made equal to this
        one (their other rules removed, and logged) instead of refused."""
        self.lock = threading.RLock()
        self.state_dir = Path(state_dir)
        self.store = Store(store_path(self.state_dir))
        self.store_id = self.store.identity()
        self.audit = AuditLog(store_path(self.state_dir))
        self._owns_dataplane = not isinstance(dataplane, Dataplane)
        self.dp = Dataplane(dataplane) if self._owns_dataplane else dataplane
        self.config = self.dp.config
        self.index = RuleIndex()
        self._last_relayout = time.monotonic()  # the start's own rebuild, just below
        self.attachments: dict[tuple[str, str | None], Attachment] = {}
        # The config file whose [[rules]] and [[sets]] are the rules (rules_from_config):
        # while set, only sync_config changes rules.
        self.rules_source: str | None = None
        with gc_paused():
            foreign = self._restore_rules(adopt_pins)
        self._next_id = max(self.store.last_rule_id(), self.table.max_id()) + 1
        self.rule_slots = SlotAllocator(self.config.max_rules, self.table.column("slot"))
        if foreign:  # another store's rules counted in these slots
            self.maps.reset_rule_counters(range(self.config.max_rules))
        else:  # a delete cut short by a crash may have left a free slot counting
            self.maps.reset_rule_counters(list(self.rule_slots.free))
        records = self.store.load_interfaces()
        # Slot 0 is the test instance's (BPF_PROG_TEST_RUN), never an interface's.
        self.iface_slots = SlotAllocator(
            self.config.max_ifaces, (r.slot for r in records), first=1
        )
        self._restore_interfaces(records)
        self.dp.drop_replaced_pins()  # every interface now runs the new build

    @property
    def program(self) -> LoadedProgram:
        return self.dp.program

    @property
    def maps(self) -> FirewallMaps:
        return self.dp.maps

    @property
    def table(self) -> RuleTable:
        """Every rule (the index's table): the truth in memory, in columns."""
        return self.index.table

    # -- start-up -------------------------------------------------------------------------

    def _restore_rules(self, adopt_pins: bool) -> bool:
        """Make the pinned maps equal to the store, as every start does: the layout is built
        beside the running one and switched to word by word (FirewallMaps.rebuild), so
        filtering never stops, nothing of the previous process's numbering needs to be
        trusted, and entries no rule of this store explains go. Returns True when the pins
        held another store's state (their counters then mean nothing here)."""
        table = self.store.load_table()
        store_id, owner = self.store_id, self.maps.identity.read()
        pin_dir = self.config.pin_dir
        foreign = owner.store_id not in (0, store_id)
        if foreign and not adopt_pins:
            raise PinOwnerError(
                f"the maps pinned under {pin_dir} belong to the store in {owner.state_dir}, "
                f"not to this one in {self.state_dir}: they would enforce rules this API does "
                f"not list. Start with that state dir, or use another bpffs dir, or adopt the "
                f"pins (--adopt-pins: they are made equal to this store, their other rules "
                f"removed)"
            )
        self.index = RuleIndex(
            port_set_base=self.maps.new_generation() * self.maps.port_set_half, table=table)
        # Plain rules need no compiling (each entry is its rule's verdict); port rules do.
        self.index.compile_added(list(table.iter_rules(table.port_rows())))
        report = self.maps.rebuild(self.index, store_id, str(self.state_dir),
                                   explain=owner.store_id != store_id)
        log.info("restored %d rules into the maps (%s)", len(table), report)
        if report.removed():
            log.warning("the pins were %s's: made them equal to this store, %s",
                        owner.state_dir or "no store", report.removed())
        return foreign

    def _rollback(self, undo) -> None:
        try:
            undo()
        except BaseException:
            # The maps may now hold entries no rule explains; the next start rebuilds them.
            log.error("reverting the maps failed; they are made equal to the store at the "
                      "next start")
            raise

    def _restore_interfaces(self, records: Sequence[InterfaceRecord]) -> None:
        for rec in records:
            try:
                self._attach(rec)
            except Exception as e:  # one bad NIC must not keep the others unguarded
                log.error("could not re-attach %s: %s", where(rec.name, rec.netns), e)
        used = {a.record.slot for a in self.attachments.values()}
        for slot in range(1, self.config.max_ifaces):
            if slot not in used:
                self.maps.clear_policy(slot)

    # -- rules ----------------------------------------------------------------------------

    def add_rules(self, specs: Sequence[RuleSpec], skip_existing: bool = False,
                  ids: Sequence[int] | None = None) -> list[Rule]:
        """Add rules, all or nothing. skip_existing: a rule whose match (prefix, proto,
        port) exists already is left out (and that rule left as it is), not refused.
        ids: theirs, ascending (a fleet node's, given by etcd: xdpfw/fleet); default: the
        next free ones."""
        _check_specs(specs)
        with self.lock:
            self._check_writable()
            given = None if ids is None else self._check_ids(ids, len(specs))
            if given is not None and skip_existing:
                raise ValueError("skip_existing cannot take given ids")
            rows = self._add(NewRules.of(specs, self.table), skip_existing, given)
            rules = list(self.table.iter_rules(rows))
            self._rows_in_id_order(given)  # rows renumber: the rules were read before
            return rules

    def _check_ids(self, ids: Sequence[int], n: int) -> np.ndarray:
        given = np.asarray(ids, dtype=np.int64)
        if len(given) != n or (len(given) and (given[0] < 1 or (given[1:] <= given[:-1]).any())):
            raise ValueError("rule ids must be given one per rule, ascending, from 1")
        taken = given[np.isin(given, self.table.column("id"))]
        if len(taken):
            raise ConflictError(f"a rule with id {int(taken[0])} exists already")
        return given

    def add_prefixes(self, prefixes: Prefixes, action: Action, comment: str = "",
                     rule_set: str = "", skip_existing: bool = False) -> range:
        """A blocklist: rules for every prefix, one action, comment and set, all or nothing,
        from columns end to end (no object per rule). Returns the new rules' ids."""
        if rule_set:
            check_set_name(rule_set)
        with self.lock:
            self._check_writable()
            new = NewRules.plain(prefixes, action, self.table.comment_id(comment),
                                 self.table.set_id(rule_set))
            return self._ids_of(self._add(new, skip_existing))

    def add_document(self, doc: RuleDocument, skip_existing: bool = False) -> range:
        """Every rule of a document (an export, a config's rules), all or nothing."""
        with self.lock:
            self._check_writable()
            return self._ids_of(self._add(doc.new_rules(self.table), skip_existing))

    def _ids_of(self, rows: np.ndarray) -> range:
        ids = self.table.col["id"]
        return range(int(ids[rows[0]]), int(ids[rows[-1]]) + 1) if len(rows) else range(0)

    def _add(self, new: NewRules, skip_existing: bool = False,
             given_ids: np.ndarray | None = None) -> np.ndarray:
        """Check, then in chunks: into the table, compiled (plain rules into a plain index
        need nothing), written to the maps by a writer thread (syscalls, no GIL) while the
        next chunk is prepared and the rows go into one SQLite transaction. On any failure
        the transaction rolls back and what was written is removed: the request changes
        nothing. Returns the new rows."""
        with gc_paused(), ThreadPoolExecutor(1, "xdpfw-map-writer") as writer:
            if skip_existing:
                new = self._without_existing(new)
            self._check_new(new)
            n = len(new)
            bulk = n >= heap.BULK  # the parse's temporaries are free now: give them back
            if bulk:
                heap.trim()
            slots = self.rule_slots.take_array(n, "rules")
            first_id, first_row = self._next_id, self.table.n
            self.table.reserve(n)
            self.maps.reserve(int(np.count_nonzero(new.prefixes.family == V4)))
            writes: list[futures.Future] = []
            try:
                with self.store.transaction():
                    for lo in range(0, n, ADD_CHUNK):
                        part = slice(lo, min(n, lo + ADD_CHUNK))
                        ids = (np.arange(first_id + part.start, first_id + part.stop)
                               if given_ids is None else given_ids[part])
                        rows = self.table.append(ids=ids, slots=slots[part],
                                                 **new.columns(part))
                        if self.index.plain_only() and not new.proto[part].any():
                            writes.append(writer.submit(
                                self.maps.add_plain, new.prefixes.take(part), slots[part],
                                new.action[part]))
                        else:
                            changes = self.index.compile_added(
                                list(self.table.iter_rules(rows)))
                            self._check_port_room()
                            writes.append(writer.submit(self._apply, changes))
                        self.store.insert_table_rows(self.table, rows)
                        if bulk:  # each chunk's temporaries, before the next one's: the peak
                            heap.trim()
                    for w in writes:
                        w.result()
            except BaseException:
                futures.wait(writes)  # never undo under a write still running
                added = np.arange(first_row, self.table.n)
                added = added[self.table.col["live"][added]]
                self._rollback(lambda: self._apply(self.index.remove_rows(added)))
                self.table.truncate(first_row)
                self.rule_slots.give(slots)
                raise
            self._next_id = (first_id + n if given_ids is None or not n
                             else max(first_id, int(given_ids[-1]) + 1))
        if bulk:
            heap.trim()
        return np.arange(first_row, first_row + n)

    def _check_port_room(self) -> None:
        """Adds may fill port_rules up to max_port_rules; the kernel map holds twice that, so
        a delete (which can split inherited entries into more) is never refused for room."""
        if self.index.port_entry_count > self.config.max_port_rules:
            raise MapFullError(
                f"no room for these proto/port rules: they compile to "
                f"{self.index.port_entry_count} port_rules entries, more than max_port_rules "
                f"({self.config.max_port_rules}); raise limits.max_port_rules"
            )

    def _apply(self, changes: Changes) -> None:
        self.maps.apply(changes, self._parent_of)

    def _parent_of(self, net: int, plen: int) -> tuple[int, int] | None:
        """For the IPv4 layout: the prefix a deleted one's addresses fall back to."""
        parent = self.index.parent_of(Prefix(V4, net, plen))
        return (parent.net, parent.length) if parent else None

    def _without_existing(self, new: NewRules) -> NewRules:
        """`new` less the rules whose match the table has (repeats within `new` stay, and
        are refused as such)."""
        p = new.prefixes
        rows = self.table.find_many(p.family, p.hi, p.lo, p.plen, new.proto, new.dport)
        absent = rows < 0
        return new if absent.all() else new.take(np.flatnonzero(absent))

    def _check_new(self, new: NewRules) -> None:
        """Refuse a rule whose match exists already, or appears twice in the request."""
        p = new.prefixes
        for lo in range(0, len(new), ADD_CHUNK):  # in chunks: bounded temporaries
            part = slice(lo, lo + ADD_CHUNK)
            rows = self.table.find_many(p.family[part], p.hi[part], p.lo[part], p.plen[part],
                                        new.proto[part], new.dport[part])
            hit = np.nonzero(rows >= 0)[0]
            if len(hit):
                existing = self.table.rule(int(rows[hit[0]]))
                raise ConflictError(
                    f"a rule for {_describe(existing)} exists already (id {existing.id})")
        again = new.first_repeat()
        if again is not None:
            raise ConflictError(f"{new.describe(again)} appears twice in this request")

    def delete_rule(self, rule_id: int) -> Rule:
        with self.lock:
            self._check_writable()
            row = self._row_of(rule_id)
            rule, rows = self.table.rule(row), np.array([row])
            changes = self.index.remove_rows(rows)
            try:
                with self.store.transaction():
                    self.store.delete_rules([rule_id])
                    self._apply(changes)
                    # Zeroed now rather than when the slot is reused: a bulk add then
                    # pays nothing for counters (slots never used are zero already).
                    self.maps.reset_rule_counter(rule.slot)
            except BaseException:
                self._rollback(lambda: self._apply(self.index.revive_rows(rows)))
                raise
            self.rule_slots.give([rule.slot])
            self.table.compact_if_sparse()
            return rule

    def _rows_of_ids(self, rule_ids: np.ndarray) -> np.ndarray:
        """The living rows of these ids (ascending, unique), all found or NotFoundError."""
        ids = self.table.col["id"][: self.table.n]
        rows = np.searchsorted(ids, rule_ids)
        ok = rows < len(ids)
        ok[ok] = (ids[rows[ok]] == rule_ids[ok]) & self.table.col["live"][rows[ok]]
        if not ok.all():
            raise NotFoundError(f"no rule with id {int(rule_ids[~ok][0])}")
        return rows

    def live_ids(self, rule_ids: np.ndarray) -> np.ndarray:
        """Those of these ids that are rules here."""
        with self.lock:
            rule_ids = np.asarray(rule_ids, dtype=np.int64)
            return rule_ids[np.isin(rule_ids, self.table.column("id"))]

    def ids_of_prefixes(self, prefixes: Prefixes) -> np.ndarray:
        """The id of the "any protocol" rule at each prefix, or -1."""
        with self.lock:
            t = self.table
            rows = t.find_many(prefixes.family, prefixes.hi, prefixes.lo, prefixes.plen,
                               np.zeros(len(prefixes), np.uint8), np.zeros(len(prefixes),
                                                                           np.uint16))
            return np.where(rows >= 0, t.col["id"][np.maximum(rows, 0)], -1)

    def find_rule(self, prefix: Prefix, proto: Proto | None, dport: int | None) -> Rule | None:
        """The rule with this match, if any."""
        with self.lock:
            row = self.table.find(prefix, proto, dport)
            return None if row is None else self.table.rule(row)

    # -- groups of rules: sets, replace, bulk delete ------------------------------------------

    def replace_set(self, name: str, doc: RuleDocument, dry_run: bool = False) -> SyncReport:
        """Make set `name` exactly the document's rules (which name no other set), in one
        change (see _swap). A rule of another set, or of no set, with a match of the
        document is a conflict: nothing changes."""
        check_set_name(name)
        doc.check_set(name)
        with self.lock:
            if not dry_run:
                self._check_writable()
            new = doc.new_rules(self.table, rule_set=name)
            return self._sync(self.table.rows_of_set(name), new, name, dry_run)

    def replace_all(self, doc: RuleDocument, dry_run: bool = False) -> SyncReport:
        """Make the rules exactly the document's (an export), in one change: rules in both
        keep their ids and counters."""
        with self.lock:
            if not dry_run:
                self._check_writable()
            return self._sync(self.table.rows(), doc.new_rules(self.table), None, dry_run)

    def sync_config(self, doc: RuleDocument, source: str, dry_run: bool = False
                    ) -> SyncReport:
        """replace_all for the config file `source` that declares every rule: from then on
        the API changes none (_check_writable), only this does."""
        with self.lock:
            report = self._sync(self.table.rows(), doc.new_rules(self.table), None, dry_run)
            if not dry_run:
                self.rules_source = source
            return report

    def _check_writable(self) -> None:
        if self.rules_source is not None:
            raise ConflictError(
                f"the rules come from {self.rules_source} ([state] rules_from_config): "
                "change that file and run `xdpfw reload`")

    def delete_where(self, ids: Sequence[int] | None = None, rule_set: str | None = None,
                     comment: str | None = None) -> SyncReport:
        """Delete, in one change, the rules with these ids (every one must exist), or those
        of a set, or those whose comment is exactly `comment`."""
        with self.lock:
            self._check_writable()
            if ids is not None:
                group = self._rows_of_ids(sorted_unique(np.asarray(ids, dtype=np.int64)))
            elif rule_set is not None:
                group = self.table.rows_of_set(rule_set)
                if rule_set and not len(group):
                    raise NotFoundError(f"no set {rule_set!r}")
            elif comment is not None:
                group = self.table.rows_with_comment(comment)
            else:
                raise ValueError("delete_where needs ids, a set or a comment")
            empty = NewRules.plain(Prefixes.empty(), Action.DROP, 0)
            return self._sync(group, empty, rule_set, dry_run=False)

    def replace_ids(self, leaving: np.ndarray, prefixes: Prefixes, action: Action,
                    comment: str, ids: np.ndarray, rule_set: str = "") -> SyncReport:
        """Rules `leaving` (ids) go and plain rules for `prefixes` come, with these ids
        (ascending, none in use), in one change (_sync): a fleet set's changed chunks
        (xdpfw/fleet/sync.py), whose ids etcd gives. A prefix in both comes back under its
        new id (a changed rule: its verdict replaced in place). A prefix that is a rule
        outside `leaving` is a conflict: nothing changes."""
        with self.lock:
            group = self._rows_of_ids(sorted_unique(leaving))
            given = self._check_ids(ids, len(prefixes))
            new = NewRules.plain(prefixes, action, self.table.comment_id(comment),
                                 self.table.set_id(rule_set))
            return self._sync(group, new, rule_set or None, dry_run=False, given_ids=given)

    def swap_rules(self, leaving: Sequence[int], specs: Sequence[RuleSpec],
                   ids: Sequence[int]) -> SyncReport:
        """Rules `leaving` (ids) go and `specs` come with these ids (ascending, not in use),
        in one change (_sync): a fleet node's rules whose etcd value changed under the same
        match (xdpfw/fleet/sync.py). That match keeps its entry and its verdict changes in
        place, where a delete then an add left it unguarded in between."""
        _check_specs(specs)
        with self.lock:
            self._check_writable()
            group = self._rows_of_ids(sorted_unique(np.asarray(leaving, dtype=np.int64)))
            given = self._check_ids(ids, len(specs))
            return self._sync(group, NewRules.of(specs, self.table), None, dry_run=False,
                              given_ids=given)

    def sets(self) -> dict[str, int]:
        """Every named set that has rules, and how many."""
        with self.lock:
            return self.table.set_sizes()

    def _sync(self, group: np.ndarray, new: NewRules, name: str | None, dry_run: bool,
              given_ids: np.ndarray | None = None) -> SyncReport:
        """given_ids: the new rules' ids, one each (replace_ids); then no rule is kept, a
        match in both is changed (it takes its new id), and the report's ids span the
        entering ones. Default: ids of the next free ones, and unchanged rules kept."""
        diff = diff_rules(self.table, group, new, name, renumber=given_ids is not None)
        examples = self._examples(diff, new)  # rows are the table's as it is now
        ids = range(0)
        how = "none" if dry_run or not diff else self._map_writes(diff, new)
        if how == "none":
            pass
        elif len(diff.removed) or len(diff.changed) or how == "relayout":
            rows = self._swap(diff, new, how, given_ids)
            ids = self._ids_of(rows)
            self._rows_in_id_order(given_ids)
            self.table.compact_if_sparse()  # rows renumber: nothing below uses them
        else:  # only additions (a set's first load): in chunks, with the bulk load's memory
            ids = self._ids_of(self._add(new.take(diff.added), given_ids=(
                None if given_ids is None else given_ids[diff.added])))
            self._rows_in_id_order(given_ids)
        return SyncReport(len(diff.added), len(diff.removed), len(diff.kept),
                          len(diff.changed), ids, examples, dry_run)

    def _rows_in_id_order(self, given_ids: np.ndarray | None) -> None:
        """After rules came with given ids, below some already here (row_of_id needs rows
        in id order): the rows renumber."""
        if given_ids is not None and not self.table.ids_ascend():
            self.table.sort_by_id()

    def _examples(self, diff: RuleDiff, new: NewRules) -> dict[str, list[str]]:
        t = self.table
        return {
            "added": [f"{new.describe(i)} {ACTION_OF[int(new.action[i])]}"
                      for i in diff.added[:EXAMPLES].tolist()],
            "removed": [_describe_rule(t.rule(r)) for r in diff.removed[:EXAMPLES].tolist()],
            "changed": [_change(t, r, new, i)
                        for r, i in zip(diff.changed[:EXAMPLES].tolist(),
                                        diff.changed_new[:EXAMPLES].tolist(), strict=True)],
        }

    def _map_writes(self, diff: RuleDiff, new: NewRules) -> str:
        """How _swap writes a change to the maps: "plain" (from columns, into a plain-only
        index), "index" (compiled), or "relayout" (the whole layout again in the other half,
        as a start does): when the running half has no room for the rules before and after
        at once, or when a compiled change is large against what stays."""
        n, gone = len(diff.entering), len(diff.gone_rows)
        if not self._fits_in_place(new.prefixes.take(diff.added)):
            log.info("%d rules out, %d in: no room for both in the maps' running half, so "
                     "they are laid out again in the other", gone, n)
            return "relayout"
        if self.index.plain_only() and not new.proto[diff.entering].any():
            return "plain"
        if n + gone >= RELAYOUT_MIN and (n + gone) * COMPILED_PER_RELAYOUT >= (
                len(self.table) + n - gone):
            return "relayout"
        return "index"

    def _swap(self, diff: RuleDiff, new: NewRules, how: str,
              given_ids: np.ndarray | None = None) -> np.ndarray:
        """Rules leave (the removed, and the old side of the changed) and enter (the added,
        and the new side of the changed) in one change: one store transaction, and in the
        maps every entering rule is written before any leaving one goes, so an address
        covered before and after is covered throughout; a prefix on both sides keeps its
        entry, its verdict changed in place (one word). Or, how == "relayout" (_map_writes),
        the maps are laid out again in the other half and switched to word by word
        (_relayout), which keeps that promise too and needs room for the rules after only.
        On failure, nothing changes. given_ids: the new list's ids (replace_ids); default:
        the next free ones. Returns the rows that entered (valid until the table compacts or
        sorts)."""
        gone, entering = diff.gone_rows, diff.entering
        enter = new.take(entering)
        n = len(enter)
        t = self.table
        with gc_paused(), ThreadPoolExecutor(1, "xdpfw-map-writer") as writer:
            slots = self.rule_slots.take_array(n, "rules")
            first_id, first_row = self._next_id, t.n
            left, rows, write = False, np.zeros(0, np.int64), None
            added = rows
            try:
                t.reserve(n)
                self.maps.reserve(int(np.count_nonzero(enter.prefixes.family == V4)))
                if how != "index":
                    t.delete(gone)
                else:
                    pending = self.index.forget(gone)
                left = True
                ids = (np.arange(first_id, first_id + n) if given_ids is None
                       else given_ids[entering])
                rows = t.append(ids=ids, slots=slots, **enter.columns(slice(None)))
                added = rows[np.isin(entering, diff.added)]  # prefixes that had no rule
                if how == "relayout":
                    job = self._relayout
                elif how == "plain":
                    job = partial(self._write_plain, rows, diff.removed)
                else:
                    touched = pending[0] + self.index.enter(list(t.iter_rules(rows)))
                    changes = self.index.recompile(touched, pending[1])
                    self._check_port_room()
                    job = partial(self._apply, changes)
                with self.store.transaction():
                    write = writer.submit(job)
                    self.store.delete_rules(t.col["id"][gone])
                    self.store.insert_table_rows(t, rows)
                    write.result()
            except BaseException:
                if write is not None:
                    futures.wait([write])  # never undo under a write still running
                self._unswap(how, gone if left else gone[:0], rows, added, write is not None)
                t.truncate(first_row)
                self.rule_slots.give(slots)
                raise
        freed = t.col["slot"][gone]
        self.maps.reset_rule_counters(freed)
        self.rule_slots.give(freed)
        self._next_id = first_id + n if given_ids is None or not n else max(
            first_id, int(ids[-1]) + 1)
        if n + len(gone) >= heap.BULK:
            heap.trim()
        return rows

    def _write_plain(self, entered: np.ndarray, removed: np.ndarray) -> None:
        """_swap's map writes for a plain-only index, from the table's columns."""
        c = self.table.col
        put = Prefixes(c["family"][entered], c["hi"][entered], c["lo"][entered],
                       c["plen"][entered])
        gone = Prefixes(c["family"][removed], c["hi"][removed], c["lo"][removed],
                        c["plen"][removed])
        self.maps.apply_plain(put, c["slot"][entered], c["action"][entered], gone,
                              self._parents4)

    def _unswap(self, how: str, gone: np.ndarray, entered: np.ndarray,
                added: np.ndarray, wrote: bool) -> None:
        """Undo _swap's table and map changes (how: "plain", "index" or "relayout", as
        _swap wrote; wrote: whether the map writes started): the rules that left are written
        back before the prefixes that came go (the same order as forward)."""
        t = self.table
        if how != "index":
            t.delete(entered)
            t.revive(gone)
            if how == "plain":
                self._rollback(lambda: self._write_plain(gone, added))
            elif wrote:
                self._rollback(self._relayout)
            return
        pending = self.index.forget(entered)
        t.revive(gone)
        touched = self.index.enter(list(t.iter_rules(gone)))
        self._rollback(lambda: self._apply(self.index.recompile(pending[0] + touched,
                                                                pending[1])))

    def _fits_in_place(self, come: Prefixes) -> bool:
        """Whether the maps' running half has IPv4 verdict ids and tbl8 groups for the rules
        here now and the prefixes `come` (new ones) at once, as a swap in place needs.
        Counted only when a change is large enough for that to be in doubt."""
        v4 = self.maps.v4
        come = come.take(come.family == V4)
        if (len(v4) + len(come) <= v4.half_ids
                and len(v4.group_of) + len(come) <= v4.half_groups):
            return True
        t, c = self.table, self.table.col
        rows = t.rows()
        rows = rows[c["family"][rows] == V4]
        keys = sorted_unique(
            (np.concatenate([c["lo"][rows], come.lo]).astype(np.int64) << 6)
            | np.concatenate([c["plen"][rows], come.plen]).astype(np.int64))
        s24 = keys[(keys & 63) > 24] >> 14  # the /24 of each prefix longer than /24
        starts = np.flatnonzero(np.concatenate(([True], s24[1:] != s24[:-1])))
        grouped = int(np.count_nonzero(np.diff(np.append(starts, len(s24))) > 1))
        return len(keys) <= v4.half_ids and grouped <= v4.half_groups

    def _relayout(self) -> None:
        """The maps made equal to the table through a layout in the other half
        (FirewallMaps.rebuild, as every start does). A half read by packets of the last
        switch is not written again within RELAYOUT_GAP_S."""
        wait = self._last_relayout + RELAYOUT_GAP_S - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        index = RuleIndex(port_set_base=self.maps.new_generation() * self.maps.port_set_half,
                          table=self.table)
        index.compile_added(list(self.table.iter_rules(self.table.port_rows())))
        self.maps.rebuild(index, self.store_id, str(self.state_dir))
        self.index = index
        self._last_relayout = time.monotonic()

    def _parents4(self, nets: np.ndarray, plens: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """For a plain-only index: the longest IPv4 rule prefix shorter than each prefix
        that covers it, as columns (nets, lengths, found), one vectorised lookup per prefix
        length the table holds."""
        t = self.table
        out_net = np.zeros(len(nets), dtype=np.uint32)
        out_len = np.zeros(len(nets), dtype=np.uint8)
        found = np.zeros(len(nets), dtype=bool)
        rows = t.any_rows()
        have = np.bincount(t.col["plen"][rows[t.col["family"][rows] == V4]],
                           minlength=ADDR_BITS[V4] + 1)
        todo = np.arange(len(nets))
        for length in range(ADDR_BITS[V4] - 1, -1, -1):
            if not have[length]:
                continue
            cand = todo[plens[todo] > length]
            if not len(cand):
                continue
            mask = ((1 << length) - 1) << (32 - length) if length else 0
            net = nets[cand].astype(np.uint32) & np.uint32(mask)
            hit = t.find_many4(net, np.full(len(cand), length, np.uint8)) >= 0
            out_net[cand[hit]], out_len[cand[hit]], found[cand[hit]] = net[hit], length, True
            todo = np.setdiff1d(todo, cand[hit], assume_unique=True)
        return out_net, out_len, found

    def _row_of(self, rule_id: int) -> int:
        row = self.table.row_of_id(rule_id)
        if row is None:
            raise NotFoundError(f"no rule with id {rule_id}")
        return row

    def get_rule(self, rule_id: int) -> Rule:
        with self.lock:
            return self.table.rule(self._row_of(rule_id))

    def list_rules(self) -> list[Rule]:
        with self.lock:
            return list(self.table.iter_rules())

    def select_rules(self, offset: int, limit: int, **filters) -> tuple[int, list[Rule]]:
        """(how many rules match the filters (RuleTable.select's), the page asked for)."""
        with self.lock:
            rows = self.table.select(**filters)
            return len(rows), list(self.table.iter_rules(rows[offset: offset + limit]))

    def export(self) -> Export:
        """A copy of every rule, grouped for writing out (document.write_text/json)."""
        with self.lock:
            return document.export(self.table)

    def explain(self, probe: Probe, interface: str | None = None,
                netns: str | None = None) -> Explanation:
        """What the program decides for the probe's packet arriving on `interface` (its
        explain instance; without an interface, the test instance's slot, whose policy
        passes), and every rule whose prefix contains the source."""
        with self.lock:
            att = None
            if interface is not None:
                att = self.attachments.get((interface, netns))
                if att is None:
                    raise NotFoundError(f"{where(interface, netns)} is not attached")
            slot = att.record.slot if att else 0
            out = self.dp.explain(slot, probe.frame())
            row = self.table.row_of_slot(out.rule_slot) if out.rule_slot != abi.NO_RULE else None
            host = Prefix(probe.family, int(ipaddress.ip_address(probe.src)),
                          ADDR_BITS[probe.family])
            covering = list(self.table.iter_rules(self.table.select(covering=host)))
            return Explanation(
                probe=probe, verdict="drop" if out.verdict == XDP_DROP else "pass",
                reason=abi.REASON_NAMES.get(out.reason, str(out.reason)),
                rule=self.table.rule(row) if row is not None else None,
                interface=(interface, netns) if att else None,
                policy="drop" if self.maps.policy(slot).policy == abi.POLICY_DROP else "pass",
                covering=covering)

    def rule_counter(self, rule: Rule) -> tuple[int, int]:
        return self.maps.rule_counter(rule.slot)

    # -- interfaces -----------------------------------------------------------------------

    def attach_interface(
        self,
        name: str,
        netns: str | None = None,
        mode: Mode = Mode.AUTO,
        policy: str = "pass",
        unparsed_policy: str = "pass",
        guard_l2: bool = False,
        chain_existing: bool = True,
        chain_prog_id: int | None = None,
    ) -> tuple[Attachment, bool]:
        """Attach, or update an attachment in place. Returns (attachment, created).

        A program already on the interface that is not xdpfw's runs after xdpfw's pass
        verdicts (chain_existing) and gets the interface back when xdpfw detaches;
        chain_prog_id chains a loaded XDP program by id (README "Other XDP programs")."""
        with self.lock:
            old = self.attachments.get((name, netns))
            slot = old.record.slot if old else self.iface_slots.take(1, "interfaces")[0]
            rec = InterfaceRecord(name, netns, str(mode), policy, unparsed_policy, guard_l2, slot)
            att = None
            before_chain = self.dp.chained(slot)
            try:
                with self.store.transaction():
                    self.store.upsert_interface(rec)
                    att = self._attach(rec, previous=old, chain_existing=chain_existing,
                                       chain_prog_id=chain_prog_id)
            except BaseException:
                if att is not None:  # attached, then the commit failed: as it was before
                    self._undo_attach(att, old, before_chain)
                if old is None:
                    self.iface_slots.give([slot])
                raise
            return att, old is None

    def _undo_attach(self, att: Attachment, old: Attachment | None,
                     chain: int | None) -> None:
        try:
            if old is not None:
                self._attach(old.record, previous=old)
                self.dp.set_chain(old.record.slot, chain)
                return
            self.dp.detach(att.record.slot)
            self.dp.release(att.record.slot)
            self.maps.clear_policy(att.record.slot)
            del self.attachments[(att.record.name, att.record.netns)]
        except Exception as e:
            log.error("undoing the attachment of %s failed: %s", where(*att_key(att)), e)

    def _attach(self, rec: InterfaceRecord, previous: Attachment | None = None,
                chain_existing: bool = True, chain_prog_id: int | None = None) -> Attachment:
        ifindex, _, _, _ = link_info(rec.name, rec.netns)
        flags = abi.IFF_GUARD_L2 if rec.guard_l2 else 0
        before = self.maps.policy(rec.slot)
        # Policy first, so the instance never runs on this interface without it.
        self.maps.set_policy(
            rec.slot, POLICY_CODE[rec.policy], POLICY_CODE[rec.unparsed_policy], flags
        )
        if previous is None:
            self.maps.reset_iface_counters(rec.slot)
        try:
            link = self.dp.attach(rec.slot, rec.name, rec.netns, Mode(rec.mode),
                                  chain_existing=chain_existing, chain_prog_id=chain_prog_id)
        except BaseException:
            self.maps.set_policy(rec.slot, before.policy, before.unparsed_policy, before.flags)
            raise
        att = Attachment(rec, ifindex, link.mode)
        self.attachments[(rec.name, rec.netns)] = att
        log.info("guarding %s in %s mode, policy %s", where(rec.name, rec.netns), link.mode,
                 rec.policy)
        return att

    def detach_interface(self, name: str, netns: str | None = None) -> Attachment:
        with self.lock:
            att = self.attachments.get((name, netns))
            if att is None:
                raise NotFoundError(f"{where(name, netns)} is not attached")
            slot, chain = att.record.slot, self.dp.chained(att.record.slot)
            detached = False
            try:
                with self.store.transaction():
                    self.store.delete_interface(name, netns)
                    self.dp.detach(slot)
                    detached = True
            except BaseException:
                if detached:  # the commit failed: the store still says guarded, so guard it
                    self.dp.attach(slot, name, netns, att.mode_in_use, chain_prog_id=chain)
                raise
            self.maps.clear_policy(slot)
            self.dp.release(slot)
            del self.attachments[(name, netns)]
            self.iface_slots.give([slot])
            return att

    def detach_all(self) -> None:
        for name, netns in list(self.attachments):
            self.detach_interface(name, netns)

    # -- program --------------------------------------------------------------------------

    def program_info(self) -> ProgInfo:
        return self.dp.program_info()

    def upgrade(self, source: Path | str | None = None) -> Upgrade:
        """A new build swapped in on every guarded interface (Dataplane.upgrade)."""
        with self.lock:
            return self.dp.upgrade(source)

    def rule_id_of_slot(self, slot: int) -> int | None:
        """Rule id behind a counter slot (events name the slot). Takes no lock (see below);
        a row that does not hold the slot (the table compacting meanwhile) names none."""
        table = self.table
        row = table.row_of_slot(slot)
        col = table.col
        if row is None or row >= len(col["slot"]) or col["slot"][row] != slot:
            return None
        return int(col["id"][row])

    # -- read views -----------------------------------------------------------------------
    # What routes, metrics and events read: snapshots of frozen values (Rule, Attachment),
    # taken under the lock. Not counts(), interface_at() and rule_id_of_slot(): /healthz
    # must not wait out a bulk import (it holds the lock for seconds), and the event reader's
    # thread must never take the lock, since an upgrade joins that thread while holding it.
    # Each copies one dict, which is one step under the GIL.

    def interfaces(self) -> list[Attachment]:
        with self.lock:
            return list(self.attachments.values())

    def interface_at(self, slot: int) -> Attachment | None:
        """The interface that runs slot's instance (events name the slot)."""
        return next((a for a in list(self.attachments.values()) if a.record.slot == slot),
                    None)

    def chained(self, att: Attachment) -> int | None:
        """The program that runs after xdpfw's pass verdicts on att's interface."""
        return self.dp.chained(att.record.slot)

    def links(self) -> list[tuple[Attachment, LinkState]]:
        """Each guarded interface with what the kernel runs there."""
        with self.lock:
            return [(a, self.dp.link_state(a.record.slot)) for a in self.attachments.values()]

    def build(self) -> Build:
        return self.dp.build()

    def counts(self) -> Counts:
        return Counts(len(self.table), len(self.attachments))

    def has_rule(self, prefix: Prefix, proto: Proto | None, dport: int | None) -> bool:
        with self.lock:
            return self.index.find(prefix, proto, dport) is not None

    def rules_by_action(self) -> dict[Action, int]:
        with self.lock:
            return self.table.action_counts()

    def rule_counters(self) -> list[tuple[Rule, int, int]]:
        """(rule, packets, bytes) of every rule that has matched."""
        with self.lock:
            out = []
            for slot, p, b in self.maps.matched_rule_counters(self.rule_slots.high):
                row = self.table.row_of_slot(slot)
                if row is not None:
                    out.append((self.table.rule(row), p, b))
            return out

    def occupancy(self) -> dict[str, tuple[int, int]]:
        """Entries and capacity of the maps that grow with rules and interfaces."""
        cfg = self.config
        with self.lock:
            prefixes = self.index.prefix_values
            v4 = len(self.maps.v4)
            return {
                "v4_verdicts": (v4, cfg.max_rules),
                "rules_v6": (len(prefixes) - v4, cfg.max_rules),
                "port_rules": (self.index.port_entry_count, cfg.max_port_rules),
                "iface_config": (len(self.attachments), cfg.max_ifaces),
                "rule_counters": (len(self.table), cfg.max_rules),
            }

    # -- stats ----------------------------------------------------------------------------

    def stats(self) -> dict:
        with self.lock:
            reasons = self.maps.reason_totals()
            ifaces = [
                {
                    "name": a.record.name,
                    "netns": a.record.netns,
                    "mode": str(a.mode_in_use),
                    **{
                        k: {"packets": p, "bytes": b}
                        for k, (p, b) in self.maps.iface_totals(a.record.slot).items()
                    },
                }
                for a in self.attachments.values()
            ]
            rules = [{"id": r.id, "packets": p, "bytes": b} for r, p, b in self.rule_counters()]
        return {
            "actions": {k: {"packets": p, "bytes": b} for k, (p, b) in reasons.items()},
            "interfaces": ifaces,
            "rules": rules,
        }

    def close(self) -> None:
        """Stop the control plane; attached programs and pinned maps keep filtering."""
        if self._owns_dataplane:
            self.dp.close()
        self.store.close()
        self.audit.close()


def att_key(att: Attachment) -> tuple[str, str | None]:
    return att.record.name, att.record.netns


def _change(t: RuleTable, row: int, new: NewRules, i: int) -> str:
    """A changed rule: its match, then what changed ("drop -> pass, comment 'a' -> 'b')."""
    old = t.rule(row)
    after = (ACTION_OF[int(new.action[i])], t.comments[int(new.comment[i])],
             t.sets[int(new.rule_set[i])])
    parts = [f"{what}{a!r} -> {b!r}" if what else f"{a} -> {b}"
             for what, a, b in (("", old.action.value, after[0].value),
                                ("comment ", old.comment, after[1]),
                                ("set ", old.rule_set, after[2])) if a != b]
    return f"{_describe(old)}: {', '.join(parts)}"


def _describe_rule(r: Rule) -> str:
    return f"{_describe(r)} {r.action.value}"


def _describe(s: RuleSpec | Rule) -> str:
    parts = [str(s.prefix)]
    if s.proto:
        parts.append(s.proto.value)
    if s.dport:
        parts.append(f"port {s.dport}")
    return " ".join(parts)
