"""Where the fleet keeps what in etcd, and how a value is checked before a node applies it.

Under the configured prefix (default /xdpfw/):

    data/meta/ids                 the last rule id handed out (decimal); every write of the
                                  REST API puts it in its transaction, so its mod_revision is
                                  the fleet's last change and the compare on it serialises
                                  writers
    data/rules/<prefix>|<proto>|<dport>
                                  one rule, JSON: {"id", "prefix", "action", "proto",
                                  "dport", "comment"}; the key is the rule's match, so two
                                  rules with one match cannot both exist
    data/sets/<name>              a set's manifest, and chunks/<sha256> its prefixes
                                  (xdpfw/fleet/chunks.py)
    data/meta/lb-ids              the last service or backend id handed out (decimal; one
                                  counter for both, below 2^32: a backend's id is its data
                                  plane generation)
    data/services/<id>            one load-balancer service whole, JSON: its definition as
                                  POST /api/v1/services takes it, with "id" and each
                                  backend's "id" (xdpfw/fleet/lb_layout.py)
    nodes/<node>                  a node's status, JSON, under a lease of that node

Nodes watch data/ only: their own status writes never wake them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TypeVar

from pydantic import BaseModel, ValidationError

from xdpfw.api.schemas import RuleCreate
from xdpfw.errors import RuleValidationError, XdpfwError
from xdpfw.rules.model import Prefix, Proto, Rule, parse_prefix
from xdpfw.service import RuleSpec

MAX_RULE_VALUE = 4096  # bytes: a rule's JSON is ~150; anything far larger is not ours
MAX_ID = (1 << 53) - 1  # ids stay exact in every JSON reader

M = TypeVar("M", bound=BaseModel)


@dataclass(frozen=True)
class Keys:
    root: bytes

    @classmethod
    def under(cls, prefix: str) -> Keys:
        return cls(prefix.encode())

    @property
    def data(self) -> bytes:
        return self.root + b"data/"

    @property
    def rules(self) -> bytes:
        return self.root + b"data/rules/"

    @property
    def ids(self) -> bytes:
        return self.root + b"data/meta/ids"

    @property
    def sets(self) -> bytes:
        return self.root + b"data/sets/"

    @property
    def lb_ids(self) -> bytes:
        return self.root + b"data/meta/lb-ids"

    @property
    def services(self) -> bytes:
        return self.root + b"data/services/"

    def service(self, service_id: int) -> bytes:
        return self.services + str(service_id).encode()

    def set(self, name: str) -> bytes:
        return self.sets + name.encode()

    def chunk(self, key: str) -> bytes:
        return self.root + b"chunks/" + key.encode()

    @property
    def nodes(self) -> bytes:
        return self.root + b"nodes/"

    def node(self, name: str) -> bytes:
        return self.nodes + name.encode()

    def rule(self, prefix: Prefix, proto: Proto | None, dport: int | None) -> bytes:
        return self.rules + match_name(prefix, proto, dport).encode()


def match_name(prefix: Prefix, proto: Proto | None, dport: int | None) -> str:
    return f"{prefix}|{proto.value if proto else 'any'}|{dport or 0}"


@dataclass(frozen=True)
class FleetRule:
    """A rule as etcd holds it: its fleet-wide id and what the REST API took."""

    id: int
    spec: RuleSpec

    def same_as(self, rule: Rule) -> bool:
        s = self.spec
        return (rule.id, rule.prefix, rule.action, rule.proto, rule.dport, rule.comment) == (
            self.id, s.prefix, s.action, s.proto, s.dport, s.comment)


def encode_rule(rule_id: int, spec: RuleSpec) -> bytes:
    return json.dumps({
        "id": rule_id, "prefix": str(spec.prefix), "action": spec.action.value,
        "proto": spec.proto.value if spec.proto else None, "dport": spec.dport,
        "comment": spec.comment,
    }, separators=(",", ":")).encode()


def decode_rule(keys: Keys, key: bytes, value: bytes) -> FleetRule:
    """The rule a key holds, validated as a POST /api/v1/rules body is, and checked to be
    the rule its key names. RuleValidationError says what is wrong (the node records it)."""
    name = key.decode(errors="replace")
    data = json_object(name, value, MAX_RULE_VALUE, "a rule", RuleValidationError)
    rule_id = data.pop("id", None)
    if not isinstance(rule_id, int) or isinstance(rule_id, bool) or not 1 <= rule_id <= MAX_ID:
        raise RuleValidationError(f"{name}: id must be an integer from 1 to {MAX_ID}")
    spec = validated(RuleCreate, data, name, RuleValidationError).spec()
    if spec.rule_set:  # RuleCreate takes one (a single appliance's sets)
        raise RuleValidationError(f"{name}: set: a fleet set is a manifest under data/sets/, "
                                  "not a field of a rule")
    if keys.rule(spec.prefix, spec.proto, spec.dport) != key:
        raise RuleValidationError(
            f"{name}: the key does not name its rule "
            f"({match_name(spec.prefix, spec.proto, spec.dport)})")
    return FleetRule(rule_id, spec)


def json_object(name: str, value: bytes, limit: int, what: str,
                error: type[XdpfwError]) -> dict:
    """A value's JSON object, or `error` saying why it is none (too large, not JSON)."""
    if len(value) > limit:
        raise error(f"{name}: {len(value)} bytes, more than {what} can be")
    try:
        data = json.loads(value)
    except (ValueError, UnicodeDecodeError):
        raise error(f"{name}: the value is not JSON") from None
    if not isinstance(data, dict):
        raise error(f"{name}: the value is not a JSON object")
    return data


def validated(model: type[M], data: dict, name: str, error: type[XdpfwError]) -> M:
    """data as the REST API's `model` takes it, or `error` naming the first field wrong."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise error(f"{name}: {where}: {err['msg']}") from None


def match_of_key(keys: Keys, key: bytes) -> tuple[Prefix, Proto | None, int | None] | None:
    """The match a rule key names, or None if the key is not a well-formed rule key."""
    name = key[len(keys.rules):].decode(errors="replace")
    parts = name.split("|")
    if not key.startswith(keys.rules) or len(parts) != 3:
        return None
    try:
        prefix = parse_prefix(parts[0])
        proto = None if parts[1] == "any" else Proto(parts[1])
        dport = int(parts[2]) or None
    except (RuleValidationError, ValueError):
        return None
    if match_name(prefix, proto, dport) != name:
        return None
    return prefix, proto, dport
