"""The firewall service: the one place that changes rules and attachments.

Every change goes: validate -> compile -> open a DB transaction -> write the maps -> commit.
If a map write fails, the transaction rolls back and the maps are put back, so a request
either takes full effect and is on disk, or changes nothing.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent import futures
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import repeat
from pathlib import Path
from typing import NamedTuple

from xdpfw.dataplane import abi
from xdpfw.dataplane.attach import Mode, link_info, where
from xdpfw.dataplane.dataplane import Build, Dataplane, LinkState, Upgrade
from xdpfw.dataplane.loader import LoadedProgram, ProgramConfig
from xdpfw.dataplane.maps import FirewallMaps
from xdpfw.dataplane.progs import ProgInfo
from xdpfw.errors import (
    ConflictError,
    MapFullError,
    NotFoundError,
    PinOwnerError,
)
from xdpfw.gcpause import gc_paused
from xdpfw.rules.compile import ACTION_CODE, Changes, RuleIndex
from xdpfw.rules.model import V4, Action, Prefix, Proto, Rule, check_match
from xdpfw.rules.store import InterfaceRecord, Store
from xdpfw.slots import SlotAllocator
from xdpfw.statedir import store_path

log = logging.getLogger(__name__)

POLICY_CODE = {"pass": abi.POLICY_PASS, "drop": abi.POLICY_DROP}


class RuleSpec(NamedTuple):
    """A rule that has no id or counter slot yet; add_rules validates its match."""

    prefix: Prefix
    action: Action
    proto: Proto | None = None
    dport: int | None = None
    comment: str = ""


@dataclass(frozen=True)
class Attachment:
    record: InterfaceRecord
    ifindex: int
    mode_in_use: Mode


class Counts(NamedTuple):
    rules: int
    interfaces: int


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
        self._owns_dataplane = not isinstance(dataplane, Dataplane)
        self.dp = Dataplane(dataplane) if self._owns_dataplane else dataplane
        self.config = self.dp.config
        self.index = RuleIndex()
        self.rules: dict[int, Rule] = {}
        self.attachments: dict[tuple[str, str | None], Attachment] = {}
        self._slot_rules: tuple[tuple[int, int], dict[int, int]] = ((-1, -1), {})
        with gc_paused():
            foreign = self._restore_rules(adopt_pins)
        self._next_id = max(self.store.last_rule_id(), max(self.rules, default=0)) + 1
        self.rule_slots = SlotAllocator(
            self.config.max_rules, (r.slot for r in self.rules.values())
        )
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

    # -- start-up -------------------------------------------------------------------------

    def _restore_rules(self, adopt_pins: bool) -> bool:
        """Make the pinned maps equal to the store, as every start does: the layout is built
        beside the running one and switched to word by word (FirewallMaps.rebuild), so
        filtering never stops, nothing of the previous process's numbering needs to be
        trusted, and entries no rule of this store explains go. Returns True when the pins
        held another store's state (their counters then mean nothing here)."""
        rules = self.store.load_rules()
        self.rules = {r.id: r for r in rules}
        store_id, owner = self.store.identity(), self.maps.identity.read()
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
            port_set_base=self.maps.new_generation() * self.maps.port_set_half)
        self.index.add(rules)
        report = self.maps.rebuild(self.index, store_id, str(self.state_dir),
                                   explain=owner.store_id != store_id)
        log.info("restored %d rules into the maps (%s)", len(rules), report)
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

    def add_rules(self, specs: Sequence[RuleSpec]) -> list[Rule]:
        """Add rules, all or nothing."""
        with self.lock, gc_paused():
            self._check_new(specs)
            slots = self.rule_slots.take(len(specs), "rules")
            first_id = self._next_id
            # tuple.__new__(Rule, row) through map(): no Python call per rule at a million.
            ids = range(first_id, first_id + len(specs))
            columns = zip(*specs, strict=True)  # prefix, action, proto, dport, comment
            rows = zip(ids, *columns, slots, strict=True)
            rules = list(map(tuple.__new__, repeat(Rule), rows))
            changes = self.index.add(rules)
            try:
                self._check_port_room()
            except MapFullError:
                self.index.remove(rules)
                self.rule_slots.give(slots)
                raise
            self._commit_new_rules(rules, slots, changes)
            self._next_id = first_id + len(rules)
            self.rules.update(zip(range(first_id, first_id + len(rules)), rules, strict=True))
            return rules

    def _commit_new_rules(self, rules: list[Rule], slots: list[int], changes: Changes) -> None:
        try:
            with self.store.transaction():
                # The map writes (mostly syscalls, which release the GIL) overlap the
                # SQLite insert; both must succeed before the commit.
                writer = _Background(self._apply, changes)
                try:
                    self.store.insert_rules(rules)
                finally:
                    writer.join()  # never roll back under a writer still running
                writer.result()
        except BaseException:
            self._rollback(lambda: self._apply(self.index.remove(rules)))
            self.rule_slots.give(slots)
            raise

    def add_prefixes_streamed(
        self, chunks: Iterable[Sequence[Prefix]], action: Action, comment: str = ""
    ) -> list[Rule]:
        """add_rules_streamed for a plain blocklist: one action and comment for every prefix,
        so no RuleSpec is built per line."""
        return self.add_rules_streamed(chunks, plain=(action, comment))

    def add_rules_streamed(
        self,
        chunks: Iterable[Sequence[RuleSpec]] | Iterable[Sequence[Prefix]],
        plain: tuple[Action, str] | None = None,
    ) -> list[Rule]:
        """Add rules that arrive in chunks (a blocklist being parsed), all or nothing.

        Each chunk is checked and compiled as it arrives, its rows go into one transaction
        that spans the request, and its map writes (kernel time, no GIL) run while the next
        chunk is parsed. On any failure, a bad line late in the list included, the transaction
        rolls back and every entry written so far is removed again, so the request changes
        nothing."""
        with (
            self.lock,
            gc_paused(),
            ThreadPoolExecutor(1, "xdpfw-bulk") as writer,
        ):
            first_id = self._next_id
            added: list[Rule] = []
            writes = []
            try:
                # One transaction for the request; each chunk's rows go in as it arrives.
                with self.store.transaction():
                    for chunk in chunks:
                        n = len(chunk)
                        if plain is None:
                            self._check_new(chunk, first_new_id=first_id)
                            columns = zip(*chunk, strict=True)
                        else:  # chunk holds prefixes; the match is the same for all
                            self._check_new_prefixes(chunk, first_new_id=first_id)
                            action, comment = plain
                            columns = (chunk, repeat(action, n), repeat(None, n),
                                       repeat(None, n), repeat(comment, n))
                        slots = self.rule_slots.take(n, "rules")
                        ids = range(first_id + len(added), first_id + len(added) + n)
                        rows = zip(ids, *columns, slots, strict=True)
                        rules = list(map(tuple.__new__, repeat(Rule), rows))
                        # Checked before the add: then each entry is (slot, action, 0).
                        from_columns = plain is not None and self.index.plain_only()
                        changes = self.index.add(rules, report=not from_columns)
                        added.extend(rules)
                        self._check_port_room()
                        if from_columns:
                            code = ACTION_CODE[plain[0]]
                            writes.append(writer.submit(self.maps.add_plain, list(chunk),
                                                        slots, code))
                        else:
                            writes.append(writer.submit(self._apply, changes))
                        self.store.insert_rules(rules)
                    for w in writes:
                        w.result()
            except BaseException:
                futures.wait(writes)  # never undo under a write still running
                if added:
                    self._rollback(lambda: self._apply(self.index.remove(added)))
                    self.rule_slots.give(r.slot for r in added)
                raise
            self._next_id = first_id + len(added)
            self.rules.update(zip(range(first_id, self._next_id), added, strict=True))
            return added

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

    def _check_new_prefixes(
        self, prefixes: Sequence[Prefix], first_new_id: int | None = None
    ) -> None:
        """Duplicate checks for plain prefix rules, as set operations (in C)."""
        unique = set(prefixes)
        taken = unique & self.index.any_rules.keys()
        if taken:
            existing = self.index.any_rules[next(iter(taken))]
            if first_new_id is not None and existing.id >= first_new_id:
                raise ConflictError(f"{existing.prefix} appears twice in this request")
            msg = f"a rule for {_describe(existing)} exists already (id {existing.id})"
            raise ConflictError(msg)
        if len(unique) < len(prefixes):
            seen: set = set()
            twice = next(p for p in prefixes if p in seen or seen.add(p))
            raise ConflictError(f"{twice} appears twice in this request")

    def _check_new(self, specs: Sequence[RuleSpec], first_new_id: int | None = None) -> None:
        """Refuse duplicates. Ids from first_new_id on belong to this same (chunked) request."""

        def clash(existing: Rule, what: str) -> ConflictError:
            if first_new_id is not None and existing.id >= first_new_id:
                return ConflictError(f"{what} appears twice in this request")
            return ConflictError(f"a rule for {what} exists already (id {existing.id})")

        plain = [s.prefix for s in specs if s.proto is None and s.dport is None]
        if len(plain) == len(specs):  # a blocklist: set operations, in C
            self._check_new_prefixes(plain, first_new_id)
            return
        seen = set()
        for s in specs:
            if s.proto is None and s.dport is None:
                key, existing = s.prefix, self.index.any_rules.get(s.prefix)
            else:
                check_match(s.proto, s.dport)
                key = (s.prefix, s.proto, s.dport)
                existing = self.index.find(*key)
            if existing is not None:
                raise clash(existing, _describe(s))
            if key in seen:
                raise ConflictError(f"{_describe(s)} appears twice in this request")
            seen.add(key)

    def delete_rule(self, rule_id: int) -> Rule:
        with self.lock:
            rule = self.get_rule(rule_id)
            changes = self.index.remove([rule])
            try:
                with self.store.transaction():
                    self.store.delete_rules([rule_id])
                    self._apply(changes)
                    # Zeroed now rather than when the slot is reused: a bulk add then
                    # pays nothing for counters (slots never used are zero already).
                    self.maps.reset_rule_counter(rule.slot)
            except BaseException:
                self._rollback(lambda: self._apply(self.index.add([rule])))
                raise
            del self.rules[rule_id]
            self.rule_slots.give([rule.slot])
            return rule

    def get_rule(self, rule_id: int) -> Rule:
        rule = self.rules.get(rule_id)
        if rule is None:
            raise NotFoundError(f"no rule with id {rule_id}")
        return rule

    def list_rules(self) -> list[Rule]:
        return list(self.rules.values())

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
        """Rule id behind a counter slot (events name the slot). Rebuilt only after a change:
        every add moves _next_id and every delete shrinks self.rules."""
        version = (len(self.rules), self._next_id)
        if self._slot_rules[0] != version:
            self._slot_rules = (version, {r.slot: r.id for r in list(self.rules.values())})
        return self._slot_rules[1].get(slot)

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
        return Counts(len(self.rules), len(self.attachments))

    def has_rule(self, prefix: Prefix, proto: Proto | None, dport: int | None) -> bool:
        with self.lock:
            return self.index.find(prefix, proto, dport) is not None

    def rules_by_action(self) -> dict[Action, int]:
        with self.lock:
            return Counter(r.action for r in self.rules.values())

    def rule_counters(self) -> list[tuple[Rule, int, int]]:
        """(rule, packets, bytes) of every rule that has matched."""
        with self.lock:
            by_slot = {r.slot: r for r in self.rules.values()}
            return [(by_slot[slot], p, b)
                    for slot, p, b in self.maps.matched_rule_counters(self.rule_slots.high)
                    if slot in by_slot]

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
                "rule_counters": (len(self.rules), cfg.max_rules),
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


def att_key(att: Attachment) -> tuple[str, str | None]:
    return att.record.name, att.record.netns


class _Background:
    """Run fn(*args) in a thread; result() joins it and re-raises what it raised."""

    def __init__(self, fn, *args) -> None:
        self._error: BaseException | None = None

        def run() -> None:
            try:
                fn(*args)
            except BaseException as e:
                self._error = e

        self._thread = threading.Thread(target=run, name="xdpfw-map-writer")
        self._thread.start()

    def join(self) -> None:
        self._thread.join()

    def result(self) -> None:
        self._thread.join()
        if self._error is not None:
            raise self._error


def _describe(s: RuleSpec | Rule) -> str:
    parts = [str(s.prefix)]
    if s.proto:
        parts.append(s.proto.value)
    if s.dport:
        parts.append(f"port {s.dport}")
    return " ".join(parts)
