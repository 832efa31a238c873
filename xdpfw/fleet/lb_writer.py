"""A REST write of a load-balancer service on a fleet node: one guarded etcd transaction.

Each change reads the service's key (and, to create one, every service) and puts its new
value whole, comparing the mod_revision of data/meta/ids (every fleet write puts it, so two
writers cannot both commit from one view and the fleet's revision moves), of data/meta/lb-ids
(the ids handed out) and of the service's key. A writer that lost the race reads again and
makes its change on what won; if the change no longer fits (its backend exists now, the
service is gone) it gets the 409 or 404 a single appliance gives.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from xdpfw.errors import ConflictError, NotFoundError, ServiceValidationError
from xdpfw.fleet.etcd import Etcd, EtcdUnavailable, b64
from xdpfw.fleet.layout import Keys
from xdpfw.fleet.lb_layout import MAX_LB_ID, FleetService, decode_service
from xdpfw.fleet.writer import ATTEMPTS, FleetWriter, put_op, same_mod
from xdpfw.lb.model import BackendSpec, ServiceSpec, check_backend, normalize_address
from xdpfw.lb.registry import FleetIds

# What a change makes of a service: (the service as etcd holds it, or None, and the next
# free id) -> the service to put, or None to delete it.
Change = Callable[[FleetService | None, "IdSource"], FleetService | None]


class IdSource:
    def __init__(self, last: int) -> None:
        self.last = last

    def take(self, n: int = 1) -> tuple[int, ...]:
        if self.last + n > MAX_LB_ID:
            raise ServiceValidationError("the fleet has handed out every service id")
        ids = tuple(range(self.last + 1, self.last + 1 + n))
        self.last += n
        return ids


class ServiceWriter:
    def __init__(self, etcd: Etcd, keys: Keys, ids: FleetWriter) -> None:
        self.etcd, self.keys, self.ids = etcd, keys, ids

    def create(self, spec: ServiceSpec) -> tuple[FleetService, int]:
        spec = replace(spec, vip=normalize_address(spec.vip, "vip"), backends=tuple(
            replace(b, address=normalize_address(b.address, "backend address"))
            for b in spec.backends))
        if len({b.address for b in spec.backends}) != len(spec.backends):
            raise ConflictError("a backend address appears twice in this request")

        def create(_old: FleetService | None, ids: IdSource) -> FleetService:
            for s in self.list():
                t = s.spec
                if (t.vip, t.port, t.proto) == (spec.vip, spec.port, spec.proto):
                    raise ConflictError(f"service {spec.vip} {spec.proto} port {spec.port} "
                                        f"exists already (id {s.id})")
            sid, *bids = ids.take(1 + len(spec.backends))
            return FleetService(FleetIds(sid, tuple(bids)), spec)

        return self._change(None, create)

    def delete(self, service_id: int) -> tuple[FleetService, int]:
        return self._change(service_id, lambda old, _ids: None)

    def add_backend(self, service_id: int, spec: BackendSpec) -> tuple[FleetService, int]:
        spec = replace(spec, address=normalize_address(spec.address, "backend address"))
        check_backend(spec)

        def add(old: FleetService, ids: IdSource) -> FleetService:
            if any(b.address == spec.address for b in old.spec.backends):
                raise ConflictError(f"service {service_id} has backend {spec.address} already")
            return FleetService(FleetIds(old.id, old.ids.backends + ids.take()),
                                replace(old.spec, backends=(*old.spec.backends, spec)))

        return self._change(service_id, add)

    def update_backend(self, service_id: int, backend_id: int, weight: int | None,
                       state: str | None) -> tuple[FleetService, int]:
        def update(old: FleetService, _ids: IdSource) -> FleetService:
            i = _index(old, backend_id)
            b = old.spec.backends[i]
            b = replace(b, weight=b.weight if weight is None else weight,
                        state=b.state if state is None else state)
            check_backend(b)
            backends = (*old.spec.backends[:i], b, *old.spec.backends[i + 1:])
            return replace(old, spec=replace(old.spec, backends=backends))

        return self._change(service_id, update)

    def delete_backend(self, service_id: int, backend_id: int) -> tuple[FleetService, int]:
        def delete(old: FleetService, _ids: IdSource) -> FleetService:
            i = _index(old, backend_id)
            keep = [j for j in range(len(old.ids.backends)) if j != i]
            return FleetService(
                FleetIds(old.id, tuple(old.ids.backends[j] for j in keep)),
                replace(old.spec, backends=tuple(old.spec.backends[j] for j in keep)))

        return self._change(service_id, delete)

    def list(self) -> list[FleetService]:
        """etcd's services (a value no node can apply is left out)."""
        _, kvs = self.etcd.get_prefix(self.keys.services)
        out = []
        for kv in kvs:
            try:
                out.append(decode_service(self.keys, kv.key, kv.value))
            except ServiceValidationError:
                continue
        return out

    # -- internals ------------------------------------------------------------------------

    def _change(self, service_id: int | None, change: Change) -> tuple[FleetService, int]:
        """Apply `change` to service `service_id` (None: a new one) in one guarded txn.
        Returns (the service as put, or as it was before a delete; the revision)."""
        for _ in range(ATTEMPTS):
            last, ids_mod = self.ids.last_id()
            lb_last, lb_mod = self.ids.counter(self.keys.lb_ids, "service id")
            old, key_mod = (None, 0) if service_id is None else self._service(service_id)
            if service_id is not None and old is None:
                raise NotFoundError(f"no service with id {service_id} in the fleet")
            ids = IdSource(lb_last)
            new = change(old, ids)
            key = self.keys.service((new or old).id)
            compare = [same_mod(self.keys.ids, ids_mod), same_mod(self.keys.lb_ids, lb_mod),
                       same_mod(key, key_mod)]
            success = [put_op(self.keys.ids, str(last).encode()),
                       put_op(self.keys.lb_ids, str(ids.last).encode()),
                       put_op(key, new.encode()) if new is not None
                       else {"request_delete_range": {"key": b64(key)}}]
            ok, revision, _ = self.etcd.txn(compare, success)
            if ok:
                return new or old, revision
        raise EtcdUnavailable("etcd is being written too fast by other nodes: try again")

    def _service(self, service_id: int) -> tuple[FleetService | None, int]:
        _, kv = self.etcd.get(self.keys.service(service_id))
        if kv is None:
            return None, 0
        try:
            return decode_service(self.keys, kv.key, kv.value), kv.mod_revision
        except ServiceValidationError as e:
            raise ConflictError(f"etcd's service {service_id} is not valid ({e}): delete it "
                                "by hand (etcdctl del) or fix it") from None


def _index(svc: FleetService, backend_id: int) -> int:
    i = svc.backend_index(backend_id)
    if i is None:
        raise NotFoundError(f"service {svc.id} has no backend with id {backend_id}")
    return i
