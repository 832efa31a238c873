"""A load-balancer service as etcd holds it: one key per service, its whole JSON.

    data/services/<id>  {"id": 7, "name": "", "vip": "10.0.0.10", "port": 80,
                         "proto": "tcp", "forward": "tx", "cpu_steer": [],
                         "health_check": null,
                         "backends": [{"id": 8, "address": "10.0.1.1", "weight": 1,
                                       "state": "active"}, ...]}

Services are few and small, so a whole-service value keeps every change of one (a backend
added, drained, deleted) one guarded put. Ids come from data/meta/lb-ids, so a service and
its backends have the same ids on every node. What is per node stays out: slots, MACs and
health, counters.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from xdpfw.api.lb_schemas import HealthCheck, ServiceCreate
from xdpfw.errors import ServiceValidationError
from xdpfw.fleet.layout import Keys, json_object, validated
from xdpfw.lb.model import ServiceSpec
from xdpfw.lb.registry import FleetIds

MAX_LB_ID = (1 << 32) - 1  # a backend's id is its slot's generation in the data plane (u32)
MAX_SERVICE_VALUE = 512 * 1024  # bytes: ~100 per backend; etcd takes 1.5 MiB a request


@dataclass(frozen=True)
class FleetService:
    """A service's fleet-wide ids and what the REST API took."""

    ids: FleetIds
    spec: ServiceSpec

    @property
    def id(self) -> int:
        return self.ids.service

    def backend_index(self, backend_id: int) -> int | None:
        return next((i for i, b in enumerate(self.ids.backends) if b == backend_id), None)

    def encode(self) -> bytes:
        s = self.spec
        health = HealthCheck.of(s.health)
        return json.dumps({
            "id": self.id, "name": s.name, "vip": s.vip, "port": s.port, "proto": s.proto,
            "forward": s.forward, "cpu_steer": list(s.cpu_steer),
            "health_check": health.model_dump() if health else None,
            "backends": [{"id": i, "address": b.address, "weight": b.weight,
                          "state": b.state}
                         for i, b in zip(self.ids.backends, s.backends, strict=True)],
        }, separators=(",", ":")).encode()


def service_id_of_key(keys: Keys, key: bytes) -> int | None:
    """The id a service key names, or None if it is not a well-formed service key."""
    name = key[len(keys.services):]
    if not key.startswith(keys.services) or not name.isdigit():
        return None
    sid = int(name)
    return sid if 1 <= sid <= MAX_LB_ID and str(sid).encode() == name else None


def decode_service(keys: Keys, key: bytes, value: bytes) -> FleetService:
    """The service a key holds, validated as a POST /api/v1/services body is, with ids that
    are the key's and unique. ServiceValidationError says what is wrong (the node records
    it)."""
    name = key.decode(errors="replace")
    data = json_object(name, value, MAX_SERVICE_VALUE, "a service", ServiceValidationError)
    if not isinstance(data.get("backends", []), list):
        raise ServiceValidationError(f"{name}: backends: not a list")
    sid = _id(name, "id", data.pop("id", None))
    if keys.service(sid) != key:
        raise ServiceValidationError(f"{name}: the key does not name its service (id {sid})")
    bids = []
    for i, b in enumerate(data.get("backends", [])):
        if not isinstance(b, dict):
            raise ServiceValidationError(f"{name}: backends.{i}: not an object")
        bids.append(_id(name, f"backends.{i}.id", b.pop("id", None)))
    if len(set(bids)) != len(bids) or sid in bids:
        raise ServiceValidationError(f"{name}: an id appears twice")
    spec = validated(ServiceCreate, data, name, ServiceValidationError).spec()
    if len({b.address for b in spec.backends}) != len(spec.backends):
        raise ServiceValidationError(f"{name}: a backend address appears twice")
    return FleetService(FleetIds(sid, tuple(bids)), spec)


def _id(name: str, where: str, v: object) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= MAX_LB_ID:
        raise ServiceValidationError(f"{name}: {where} must be an integer from 1 to "
                                     f"{MAX_LB_ID}")
    return v
