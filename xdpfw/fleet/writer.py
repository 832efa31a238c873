"""The fleet's write path: a REST write becomes one etcd transaction, guarded by revision.

Every transaction compares data/meta/ids' mod_revision with the one read just before, and
puts it again: two writers anywhere in the fleet cannot both commit from the same view, so
no update is lost and ids stay unique. A writer that lost the race reads again and retries;
if what it wanted to create now exists, it gets the 409 a single appliance gives. The answer
comes once etcd has committed; each node (this one too) applies the change from its watch.
"""

from __future__ import annotations

from collections.abc import Sequence

from xdpfw.errors import ConflictError, NotFoundError, RuleValidationError
from xdpfw.fleet.etcd import Etcd, EtcdError, EtcdUnavailable, KeyValue, b64
from xdpfw.fleet.layout import Keys, decode_rule, encode_rule, match_name
from xdpfw.rules.model import Rule
from xdpfw.service import RuleSpec

# etcd refuses a transaction of more than --max-txn-ops (128 by default) operations per
# branch; a rule costs one put and one compare, and the ids key one more of each.
MAX_TXN_RULES = 100
ATTEMPTS = 50  # lost races before a write gives up (each loser saw another commit)


class FleetWriter:
    def __init__(self, etcd: Etcd, keys: Keys) -> None:
        self.etcd, self.keys = etcd, keys

    def last_id(self) -> tuple[int, int]:
        """(the last rule id handed out, the mod_revision of the ids key: 0 if none yet)."""
        return self.counter(self.keys.ids, "rule id")

    def counter(self, key: bytes, what: str) -> tuple[int, int]:
        """(the last `what` a counter key handed out, its mod_revision: 0 if none yet)."""
        _, kv = self.etcd.get(key)
        if kv is None:
            return 0, 0
        try:
            return int(kv.value), kv.mod_revision
        except ValueError:
            raise EtcdError(f"{key.decode()} holds {kv.value[:40]!r}, not the last {what}: "
                            "fix it by hand (etcdctl put) before writing") from None

    def add_rules(self, specs: Sequence[RuleSpec]) -> tuple[list[int], int]:
        """Create rules, all or nothing. Returns (their ids, the revision that holds them)."""
        check_txn_size(len(specs))
        keys = [self.keys.rule(s.prefix, s.proto, s.dport) for s in specs]
        if len(set(keys)) != len(keys):
            raise ConflictError("a rule appears twice in this request")
        for _ in range(ATTEMPTS):
            last, mod = self.last_id()
            ids = list(range(last + 1, last + 1 + len(specs)))
            compare = [same_mod(self.keys.ids, mod)] + [_absent(k) for k in keys]
            success = [put_op(self.keys.ids, str(ids[-1] if ids else last).encode())] + [
                put_op(k, encode_rule(i, s)) for k, i, s in zip(keys, ids, specs, strict=True)]
            failure = [_range(k) for k in keys]
            ok, revision, responses = self.etcd.txn(compare, success, failure)
            if ok:
                return ids, revision
            self._refuse_existing(keys, responses)
        raise EtcdUnavailable("etcd is being written too fast by other nodes: try again")

    def _refuse_existing(self, keys: list[bytes], responses: list[dict]) -> None:
        for key, resp in zip(keys, responses, strict=False):
            kvs = resp.get("response_range", {}).get("kvs", [])
            if kvs:
                existing = KeyValue.of(kvs[0])
                name = key[len(self.keys.rules):].decode(errors="replace")
                try:
                    rid = f" (id {decode_rule(self.keys, key, existing.value).id})"
                except RuleValidationError:
                    rid = ""
                raise ConflictError(f"a rule for {name.replace('|', ' ')} exists already{rid}")

    def delete_rule(self, rule: Rule) -> int:
        """Delete the rule etcd holds under rule's match, if it is still that rule (its id).
        Returns the revision of the delete."""
        key = self.keys.rule(rule.prefix, rule.proto, rule.dport)
        for _ in range(ATTEMPTS):
            last, mod = self.last_id()
            _, kv = self.etcd.get(key)
            held = None
            if kv is not None:
                try:
                    held = decode_rule(self.keys, key, kv.value).id
                except RuleValidationError:
                    held = None
            if held != rule.id:
                now = f"as id {held}" if held else "no longer"
                raise NotFoundError(f"no rule with id {rule.id} in the fleet (etcd holds "
                                    f"{match_name(rule.prefix, rule.proto, rule.dport)} {now})")
            compare = [same_mod(self.keys.ids, mod), same_mod(key, kv.mod_revision)]
            success = [put_op(self.keys.ids, str(last).encode()),
                       {"request_delete_range": {"key": b64(key)}}]
            ok, revision, _ = self.etcd.txn(compare, success)
            if ok:
                return revision
        raise EtcdUnavailable("etcd is being written too fast by other nodes: try again")


def check_txn_size(n: int) -> None:
    if n > MAX_TXN_RULES:
        raise RuleValidationError(
            f"{n} rules in one request: a fleet writes a request in one etcd transaction, "
            f"which holds at most {MAX_TXN_RULES} rules")


def same_mod(key: bytes, mod_revision: int) -> dict:
    return {"key": b64(key), "target": "MOD", "result": "EQUAL",
            "mod_revision": str(mod_revision)}


def _absent(key: bytes) -> dict:
    return {"key": b64(key), "target": "CREATE", "result": "EQUAL", "create_revision": "0"}


def put_op(key: bytes, value: bytes) -> dict:
    return {"request_put": {"key": b64(key), "value": b64(value)}}


def _range(key: bytes) -> dict:
    return {"request_range": {"key": b64(key)}}
