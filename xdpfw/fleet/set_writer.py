"""A fleet set replaced through the REST API: chunks first, then the manifest in one guarded
transaction (xdpfw/fleet/chunks.py says the layout).

The chunks are content-addressed, so writing them before the manifest changes nothing any
node applies, and a writer that loses the race for the manifest retries with them already
there. Chunks no manifest names any more are deleted once the new manifest is in; nodes read
chunks at their manifest's revision, so a node behind still finds them until etcd compacts.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from xdpfw.errors import (
    ConflictError,
    FleetStoreError,
    FleetUnavailableError,
    NotFoundError,
    RuleValidationError,
)
from xdpfw.fleet.chunks import (
    Entry,
    Manifest,
    canonical,
    chunk_key,
    cut,
    decode_manifest,
    pack,
)
from xdpfw.fleet.etcd import Etcd, EtcdUnavailable, b64
from xdpfw.fleet.layout import MAX_ID, Keys
from xdpfw.fleet.writer import ATTEMPTS, FleetWriter, put_op, same_mod
from xdpfw.rules.model import Action, check_set_name
from xdpfw.rules.table import Prefixes
from xdpfw.service import Firewall

log = logging.getLogger(__name__)

CHUNK_WRITERS = 4  # chunk puts in flight at once
GC_PER_TXN = 100  # deletes per transaction (etcd's --max-txn-ops is 128)


class SetWriter:
    def __init__(self, etcd: Etcd, keys: Keys, ids: FleetWriter, fw: Firewall) -> None:
        self.etcd, self.keys, self.ids, self.fw = etcd, keys, ids, fw

    def replace(self, name: str, prefixes: Prefixes, action: Action, comment: str) -> dict:
        """Make set `name` exactly these prefixes. Returns what the manifest says and the
        revision that holds it."""
        check_set_name(name)
        if not len(prefixes):
            raise RuleValidationError(f"set {name}: no prefix (DELETE the set to remove it)")
        if len(comment) > 256:
            raise RuleValidationError("comment: at most 256 characters")
        p = canonical(prefixes)
        parts = cut(p)
        blobs = [pack(c) for c in parts]
        hashes = [chunk_key(b) for b in blobs]
        written: set[str] = set()
        for _ in range(ATTEMPTS):
            last, ids_mod = self.ids.last_id()
            old, set_mod = self._manifest(name)
            reuse = ({e.key: e for e in old.entries}
                     if old and (old.action, old.comment) == (action, comment) else {})
            entries, fresh, next_id = [], [], last + 1
            for h, c in zip(hashes, parts, strict=True):
                e = reuse.pop(h, None)
                if e is None:
                    e = Entry(h, len(c), next_id)
                    next_id += len(c)
                    fresh.append(e)
                entries.append(e)
            if next_id - 1 > MAX_ID:
                raise RuleValidationError("the fleet has handed out every rule id")
            self._refuse_taken(name, p, old)
            self._put_chunks({e.key for e in fresh} - written, dict(zip(hashes, blobs,
                                                                        strict=True)))
            written |= {e.key for e in fresh}
            new = Manifest(action, comment, tuple(entries))
            ok, revision, _ = self.etcd.txn(
                [same_mod(self.keys.ids, ids_mod), same_mod(self.keys.set(name), set_mod)],
                [put_op(self.keys.ids, str(next_id - 1).encode()),
                 put_op(self.keys.set(name), new.encode())])
            if ok:
                self._collect(old)
                return {"name": name, "count": new.count, "chunks": len(entries),
                        "chunks_written": len(fresh), "chunks_kept": len(entries) - len(fresh),
                        "action": action.value, "comment": comment, "revision": revision}
        raise EtcdUnavailable("etcd is being written too fast by other nodes: try again")

    def delete(self, name: str) -> int:
        check_set_name(name)
        for _ in range(ATTEMPTS):
            last, ids_mod = self.ids.last_id()
            old, set_mod = self._manifest(name)
            if not set_mod:
                raise NotFoundError(f"no fleet set {name}")
            ok, revision, _ = self.etcd.txn(
                [same_mod(self.keys.ids, ids_mod), same_mod(self.keys.set(name), set_mod)],
                [put_op(self.keys.ids, str(last).encode()),
                 {"request_delete_range": {"key": b64(self.keys.set(name))}}])
            if ok:
                self._collect(old)
                return revision
        raise EtcdUnavailable("etcd is being written too fast by other nodes: try again")

    def list(self) -> list[dict]:
        _, kvs = self.etcd.get_prefix(self.keys.sets)
        out = []
        for kv in kvs:
            name = kv.key[len(self.keys.sets):].decode(errors="replace")
            try:
                m = decode_manifest(name, kv.value, MAX_ID)
                out.append({"name": name, "count": m.count, "chunks": len(m.entries),
                            "action": m.action.value, "comment": m.comment,
                            "revision": kv.mod_revision})
            except RuleValidationError as e:
                out.append({"name": name, "error": str(e), "revision": kv.mod_revision})
        return out

    # -- internals ------------------------------------------------------------------------

    def _manifest(self, name: str) -> tuple[Manifest | None, int]:
        _, kv = self.etcd.get(self.keys.set(name))
        if kv is None:
            return None, 0
        try:
            return decode_manifest(name, kv.value, MAX_ID), kv.mod_revision
        except RuleValidationError:
            return None, kv.mod_revision  # a hand-written one: replaced whole

    def _refuse_taken(self, name: str, p: Prefixes, old: Manifest | None) -> None:
        """A prefix that is a rule here already, and not of this set, would be refused by
        every node: refuse it now (409), as a single appliance does."""
        ids = self.fw.ids_of_prefixes(p)
        taken = ids >= 0
        if old is not None and taken.any():
            mine = np.zeros(len(ids), bool)
            for e in old.entries:
                mine |= (ids >= e.first_id) & (ids < e.first_id + e.count)
            taken &= ~mine
        if taken.any():
            i = int(np.argmax(taken))
            raise ConflictError(f"set {name}: a rule for {p.prefix(i)} exists already "
                                f"(id {int(ids[i])})")

    def _put_chunks(self, wanted: set[str], blobs: dict[str, bytes]) -> None:
        def put(h: str) -> None:
            key = self.keys.chunk(h)
            self.etcd.txn([{"key": b64(key), "target": "CREATE", "result": "EQUAL",
                            "create_revision": "0"}],
                          [{"request_put": {"key": b64(key), "value": b64(blobs[h])}}])

        with ThreadPoolExecutor(CHUNK_WRITERS, "xdpfw-fleet-chunks") as pool:
            list(pool.map(put, sorted(wanted)))

    def _collect(self, old: Manifest | None) -> None:
        """Delete the chunks of `old` that no manifest names now (best effort: a chunk left
        behind costs space, never correctness)."""
        if old is None:
            return
        try:
            _, kvs = self.etcd.get_prefix(self.keys.sets)
            named = set()
            for kv in kvs:
                try:
                    m = decode_manifest("", kv.value, MAX_ID)
                    named |= {e.key for e in m.entries}
                except RuleValidationError:
                    continue
            gone = sorted({e.key for e in old.entries} - named)
            for i in range(0, len(gone), GC_PER_TXN):
                self.etcd.txn([], [{"request_delete_range": {"key": b64(self.keys.chunk(h))}}
                                   for h in gone[i:i + GC_PER_TXN]])
        except (FleetUnavailableError, FleetStoreError) as e:  # the write itself is in
            log.warning("fleet: chunks of a replaced set were left in etcd: %s", e)
