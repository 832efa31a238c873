"""The sync engine: a node's agent that makes its firewall equal to what etcd holds.

It watches data/ from the revision it last applied and turns each batch of changes into
Firewall calls (delete_where, replace_ids and add_rules with the fleet's ids): the same
validate, compile and apply path as the REST API, in revision order; a load-balancer
service's key goes to the LoadBalancer the same way (lb_sync.py). Whatever arrived while
a batch was applied is the next batch. When the watch cannot resume (history compacted,
another cluster, a first start), it reads a snapshot and applies only the difference from
what the node enforces.

Fail-static: while etcd is away the node keeps what it applied, and retries with backoff.
A key whose value is not a valid rule is refused alone (the node keeps what that key held
before, if anything) and named in the node's status; nothing else of its batch is held back.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from xdpfw.errors import ConflictError, RuleValidationError, XdpfwError
from xdpfw.fleet.cache import FleetCache, Position
from xdpfw.fleet.chunks import Entry, Manifest, decode_manifest, unpack
from xdpfw.fleet.etcd import Compacted, Etcd, EtcdError, EtcdUnavailable, KeyValue, Watch
from xdpfw.fleet.layout import MAX_ID, FleetRule, Keys, decode_rule, match_of_key
from xdpfw.fleet.lb_sync import ServiceApplier
from xdpfw.rules.table import Prefixes
from xdpfw.service import Firewall

log = logging.getLogger(__name__)

BACKOFF_MIN_S, BACKOFF_MAX_S = 0.2, 5.0
MAX_REFUSED = 100  # refused keys named in the status (the count is exact)
STOP_POLL_S = 0.2  # how soon the agent sees stop() while no change arrives


class ApplyFailed(XdpfwError):
    """The firewall refused a batch (map full, store failing): resync once it can."""


@dataclass
class NodeState:
    """What the node's status says; read by the publisher and the API."""

    health: str = "starting"  # ok | degraded (refused keys) | etcd-unreachable | apply-failed
    applied: int = 0
    resume: int = 0
    last_error: str | None = None
    last_error_at: float | None = None
    refused: dict[str, str] = field(default_factory=dict)  # key -> why
    refused_count: int = 0
    resyncs: int = 0


class SyncEngine:
    def __init__(self, fw: Firewall, etcd: Etcd, keys: Keys, cache: FleetCache,
                 services: ServiceApplier | None = None) -> None:
        """services: applies data/services/ to the load balancer (None: no LB here, the
        keys are left alone)."""
        self.fw, self.etcd, self.keys, self.cache = fw, etcd, keys, cache
        self.services = services
        self.position = cache.position()
        self.state = NodeState(applied=self.position.applied, resume=self.position.resume)
        self.changed = threading.Condition()  # notified after every apply and health change
        self._refused: dict[bytes, str] = {}
        self.sets: dict[str, Manifest] = {}  # as applied here (and kept in the cache)
        for name, blob in cache.sets().items():
            try:
                self.sets[name] = decode_manifest(name, blob, MAX_ID)
            except XdpfwError:
                log.error("fleet: the cached manifest of set %s is unreadable", name)
        self._stop = threading.Event()
        self._watch: Watch | None = None
        self._thread = threading.Thread(target=self._run, name="xdpfw-fleet-sync", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._watch is not None:
            self._watch.close()
        self._thread.join(timeout=10)

    def wait_applied(self, revision: int, timeout_s: float) -> bool:
        """Until this node has applied `revision` (or a later one)."""
        with self.changed:
            return self.changed.wait_for(lambda: self.state.applied >= revision, timeout_s)

    # -- the loop -------------------------------------------------------------------------

    def _run(self) -> None:
        backoff = BACKOFF_MIN_S
        checked = False  # has a first contact shown whether the watch can resume?
        resync = False
        while not self._stop.is_set():
            try:
                if not checked:
                    resync |= not self._can_resume()
                    checked = True
                if resync:
                    self._resync()
                    resync = False
                backoff = BACKOFF_MIN_S
                self._follow()
            except Compacted as e:
                log.warning("fleet: %s; resyncing from a snapshot", e)
                resync = True
                continue
            except EtcdUnavailable as e:
                self._set_health("etcd-unreachable", str(e))
                checked = False  # what comes back may be another cluster
            except (EtcdError, ApplyFailed) as e:
                self._set_health("apply-failed" if isinstance(e, ApplyFailed)
                                 else "etcd-unreachable", str(e))
                resync = True
            except Exception as e:  # a bug must not end the agent: it retries, and says so
                log.exception("fleet: the sync engine failed")
                self._set_health("apply-failed", f"{type(e).__name__}: {e}")
                resync = True
            self._stop.wait(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX_S)

    def _can_resume(self) -> bool:
        """A watch from the cached revision is right only on the same cluster, and only if
        that revision is not ahead of etcd (a cluster rebuilt from scratch)."""
        cluster, revision = self.etcd.header(self.keys.ids)
        pos = self.position
        ok = pos.cluster_id == cluster and 0 < pos.resume <= revision
        if pos.cluster_id and pos.cluster_id != cluster:
            log.warning("fleet: etcd is another cluster (%s, was %s): resyncing", cluster,
                        pos.cluster_id)
        if not ok:
            self.position = Position(cluster, 0, 0)
        return ok

    def _resync(self) -> None:
        """Make the firewall equal to a snapshot of data/, touching only what differs."""
        revision, kvs = self.etcd.get_prefix(self.keys.data)
        changes: dict[bytes, KeyValue | None] = {kv.key: kv for kv in kvs}
        for name in self.sets:  # sets etcd no longer holds go
            changes.setdefault(self.keys.set(name), None)
        members = self.member_ids()
        for rule in self.fw.list_rules():  # rules etcd no longer holds go
            if not members.contains(rule.id):
                changes.setdefault(self.keys.rule(rule.prefix, rule.proto, rule.dport), None)
        for key in self.services.local_keys() if self.services else ():
            changes.setdefault(key, None)  # and services
        self._refused.clear()
        applied = max((kv.mod_revision for kv in kvs), default=0)
        counts = self._apply(changes)
        self.state.resyncs += 1
        log.info("fleet: resynced at revision %d: %s", revision, counts)
        self._advance(revision, applied)

    def _follow(self) -> None:
        """Watch from the resume revision, applying what arrives together as one batch."""
        watch = self._watch = self.etcd.watch(self.keys.data, self.position.resume + 1)
        arrivals: queue.Queue = queue.Queue()
        reader = threading.Thread(target=_read_into, args=(watch, arrivals),
                                  name="xdpfw-fleet-watch", daemon=True)
        reader.start()
        try:
            while not self._stop.is_set():
                try:  # a quiet watch blocks its reader, closed or not: stop() must not wait
                    batch = [arrivals.get(timeout=STOP_POLL_S)]
                except queue.Empty:
                    continue
                while not arrivals.empty():
                    batch.append(arrivals.get_nowait())
                failure = next((b for b in batch if isinstance(b, BaseException)), None)
                events = [ev for b in batch if not isinstance(b, BaseException)
                          for ev in b[1]]
                if events:
                    changes: dict[bytes, KeyValue | None] = {}
                    for ev in events:  # in revision order: the last change of a key wins
                        changes[ev.kv.key] = None if ev.deleted else ev.kv
                    self._apply(changes)
                    last = max(ev.kv.mod_revision for ev in events)
                    self._advance(last, last)
                elif self.state.health in ("starting", "etcd-unreachable"):
                    self._set_health(self._health(), None)  # the watch is up: etcd is back
                if failure is not None:
                    raise failure
        finally:
            watch.close()
            self._watch = None

    # -- applying -------------------------------------------------------------------------

    def member_ids(self) -> IdRanges:
        """The ids of the rules that belong to the sets applied here."""
        return IdRanges([e for m in self.sets.values() for e in m.entries])

    def _apply(self, changes: dict[bytes, KeyValue | None]) -> dict[str, int]:
        """Turn key changes into one delete_where call, one replace_ids call per set that
        changed, and one add_rules call, in that order (a prefix may move between a rule of
        its own and a set)."""
        deletes, swaps, adds = self._plan_rules(changes)
        try:
            if deletes:
                self.fw.delete_where(ids=deletes)
            if swaps:  # a value changed under its match: one change, no gap
                self.fw.swap_rules([old for old, _ in swaps], [r.spec for _, r in swaps],
                                   [r.id for _, r in swaps])
            sets = sum(self._apply_set(key, kv) for key, kv in changes.items()
                       if key.startswith(self.keys.sets))
            self.fw.add_rules([r.spec for r in adds], ids=[r.id for r in adds])
        except (XdpfwError, OSError) as e:
            if isinstance(e, Compacted):
                raise
            raise ApplyFailed(f"the firewall refused etcd's changes: {e}") from e
        services = sum(self._apply_service(key, kv) for key, kv in changes.items()
                       if key.startswith(self.keys.services))
        return {"added": len(adds), "deleted": len(deletes), "changed": len(swaps),
                "sets": sets,
                "services": services, "refused": len(self._refused)}

    def _apply_service(self, key: bytes, kv: KeyValue | None) -> int:
        """A service changed: applied alone (xdpfw/fleet/lb_sync.py); what this node refuses
        or cannot resolve is said in its status. Returns 1 if it was applied."""
        if self.services is None:
            return 0
        why, unresolved = self.services.apply(key, kv)
        self._refuse(key, why)
        for what in unresolved:
            self.state.last_error, self.state.last_error_at = what, time.time()
            log.warning("fleet: %s", what)
        return int(why is None)

    def _apply_set(self, key: bytes, kv: KeyValue | None) -> int:
        """A set's manifest changed: its chunks that left go and those that came are read (at
        the manifest's revision) and added, in one Firewall.replace_ids; here the rules are
        in the set of that name (GET /api/v1/sets). Returns 1 if the set changed here."""
        name = key[len(self.keys.sets):].decode(errors="replace")
        old = self.sets.get(name)
        try:
            new = None if kv is None else decode_manifest(name, kv.value, MAX_ID)
        except XdpfwError as e:
            self._refuse(key, str(e))  # what the set was here stays in force
            return 0
        before = set(old.entries) if old else set()
        after = set(new.entries) if new else set()
        if old and new and (old.action, old.comment) != (new.action, new.comment) \
                and before & after:
            self._refuse(key, f"set {name}: a new action or comment needs new chunk ids")
            return 0
        leaving = IdRanges(sorted(before - after, key=lambda e: e.first_id)).all()
        coming = sorted(after - before, key=lambda e: e.first_id)
        present = set(self.fw.live_ids(np.array([e.first_id for e in coming],
                                                np.int64)).tolist())
        coming = [e for e in coming if e.first_id not in present]  # a replay after a crash
        started = time.monotonic()
        try:
            parts = [unpack(e.key, self._chunk(e, kv)) for e in coming]
            if any(len(p) != e.count for p, e in zip(parts, coming, strict=True)):
                raise RuleValidationError(f"set {name}: a chunk's count differs")
            prefixes = Prefixes.concat(parts)
            ids = IdRanges(coming).all()
            self.fw.replace_ids(self.fw.live_ids(leaving), prefixes, (new or old).action,
                                (new or old).comment, ids, rule_set=name)
        except (RuleValidationError, ConflictError) as e:
            self._refuse(key, f"set {name}: {e}")
            return 0
        self._refuse(key, None)
        log.info("fleet: set %s: %d rules out, %d in (%d chunks) in %.2f s", name,
                 len(leaving), len(prefixes), len(coming), time.monotonic() - started)
        if new is None:
            self.sets.pop(name, None)
        else:
            self.sets[name] = new
        self.cache.save_set(name, None if new is None else new.encode())
        return 1

    def _chunk(self, e: Entry, kv: KeyValue | None) -> bytes:
        got = self.etcd.get_at(self.keys.chunk(e.key), kv.mod_revision) if kv else None
        if got is None:
            raise RuleValidationError(f"chunk {e.key[:16]} is missing from etcd")
        return got.value

    def _plan_rules(self, changes: dict[bytes, KeyValue | None]
                    ) -> tuple[list[int], list[tuple[int, FleetRule]], list[FleetRule]]:
        """Which rules go, which are swapped (a new value under a match that is a rule here,
        with a new id: (the local id, the rule)), and which come, for the rule keys among
        these changes."""
        deletes: list[int] = []
        swaps: list[tuple[int, FleetRule]] = []
        adds: list[FleetRule] = []
        for key, kv in changes.items():
            if not key.startswith(self.keys.rules):
                continue  # data/meta, data/sets, or what a later version keeps
            match = match_of_key(self.keys, key)
            if match is None:
                self._refuse(key, "not a rule key (<prefix>|<proto or any>|<port or 0>)"
                             if kv is not None else None)
                continue
            local = self.fw.find_rule(*match)
            if kv is None:
                self._refuse(key, None)
                if local is not None:
                    deletes.append(local.id)
                continue
            try:
                want = decode_rule(self.keys, key, kv.value)
            except XdpfwError as e:
                self._refuse(key, str(e))  # the rule this key held before, if any, stays
                continue
            self._refuse(key, None)
            if local is not None and want.same_as(local):
                continue
            if local is not None and want.id != local.id:
                swaps.append((local.id, want))
                continue
            if local is not None:  # a hand-written value kept the id: the old way
                deletes.append(local.id)
            adds.append(want)
        leaving, seen = set(deletes) | {old for old, _ in swaps}, set()
        swaps = sorted((p for p in swaps if self._claim_id(p[1], seen, leaving)),
                       key=lambda p: p[1].id)
        adds = sorted((r for r in adds if self._claim_id(r, seen, leaving)), key=lambda r: r.id)
        return deletes, swaps, adds

    def _claim_id(self, r: FleetRule, seen: set[int], leaving: set[int]) -> bool:
        """A hand-written value may reuse an id: the first holder keeps it (`seen`), and an
        id of a rule here that is not `leaving` is refused."""
        if r.id in seen or (r.id not in leaving and self._id_taken(r.id)):
            key = self.keys.rule(r.spec.prefix, r.spec.proto, r.spec.dport)
            self._refuse(key, f"id {r.id} belongs to another rule")
            return False
        seen.add(r.id)
        return True

    def _id_taken(self, rule_id: int) -> bool:
        try:
            self.fw.get_rule(rule_id)
        except XdpfwError:
            return False
        return True

    def _refuse(self, key: bytes, why: str | None) -> None:
        if why is None:
            self._refused.pop(key, None)
            return
        if key not in self._refused:
            log.error("fleet: refused %s", why)
        self._refused[key] = why
        self.state.last_error, self.state.last_error_at = why, time.time()

    def _advance(self, resume: int, applied: int) -> None:
        self.position = Position(self.position.cluster_id, max(resume, self.position.resume),
                                 max(applied, self.position.applied))
        self.cache.save(self.position)
        with self.changed:
            s = self.state
            s.resume, s.applied = self.position.resume, self.position.applied
            s.refused_count = len(self._refused)
            s.refused = {k.decode(errors="replace"): v
                         for k, v in list(self._refused.items())[:MAX_REFUSED]}
            s.health = self._health()
            self.changed.notify_all()

    def _health(self) -> str:
        return "degraded" if self._refused else "ok"

    def _set_health(self, health: str, error: str | None) -> None:
        with self.changed:
            if error is not None and health != self.state.health:
                log.warning("fleet: %s: %s", health, error)
            self.state.health = health
            if error is not None:
                self.state.last_error, self.state.last_error_at = error, time.time()
            self.changed.notify_all()


class IdRanges:
    """The ids of some chunks' rules, as ranges."""

    def __init__(self, entries: list[Entry]) -> None:
        ordered = sorted(entries, key=lambda e: e.first_id)
        self.starts = np.array([e.first_id for e in ordered], np.int64)
        self.ends = np.array([e.first_id + e.count for e in ordered], np.int64)

    def contains(self, rule_id: int) -> bool:
        i = int(np.searchsorted(self.starts, rule_id, side="right")) - 1
        return i >= 0 and rule_id < self.ends[i]

    def all(self) -> np.ndarray:
        if not len(self.starts):
            return np.zeros(0, np.int64)
        return np.concatenate([np.arange(a, b) for a, b in zip(self.starts.tolist(),
                                                               self.ends.tolist(),
                                                               strict=True)])


def _read_into(watch: Watch, out: queue.Queue) -> None:
    try:
        for item in watch:
            out.put(item)
        out.put(EtcdUnavailable("the watch ended"))
    except BaseException as e:
        out.put(e)

