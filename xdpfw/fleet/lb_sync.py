"""The sync engine's part for load-balancer services: make this node's services equal to
etcd's data/services/, through the LoadBalancer calls the REST API makes.

A service whose definition (VIP, port, protocol, forward mode, name, CPUs, health check)
changed is deleted and created again; one whose backends changed gets the backend calls that
make it equal (delete, add with the fleet's id, update weight or state). What stays per node:
slots, MAC resolution, health checks, counters. A backend this node cannot resolve is kept
unresolved (it gets no traffic here, the refresher retries it) and named in the node's
last_error; a service this node refuses (a CPU it does not have, a VIP:port taken by a proxy
of its own) is a refused key, and the rest applies.
"""

from __future__ import annotations

import sqlite3

from xdpfw.errors import XdpfwError
from xdpfw.fleet.etcd import KeyValue
from xdpfw.fleet.layout import Keys
from xdpfw.fleet.lb_layout import FleetService, decode_service, service_id_of_key
from xdpfw.lb.model import ServiceState
from xdpfw.lb.service import LoadBalancer


class ServiceApplier:
    def __init__(self, lb: LoadBalancer, keys: Keys) -> None:
        self.lb, self.keys = lb, keys

    def local_keys(self) -> list[bytes]:
        """The keys of the services this node has (a resync deletes those etcd lacks)."""
        with self.lb.lock:
            return [self.keys.service(sid) for sid in self.lb.services]

    def apply(self, key: bytes, kv: KeyValue | None) -> tuple[str | None, list[str]]:
        """Make the service of `key` what kv holds (None: gone). Returns (why the key is
        refused, or None; what this node could not resolve)."""
        sid = service_id_of_key(self.keys, key)
        if sid is None:
            return ("not a service key (data/services/<id>)" if kv is not None else None), []
        try:
            want = None if kv is None else decode_service(self.keys, key, kv.value)
        except XdpfwError as e:
            return str(e), []  # what this key held here before, if anything, stays
        try:
            with self.lb.lock:
                self._apply(sid, want)
                svc = self.lb.services.get(sid)
                unresolved = [f"service {sid} backend {b.rec.address}: {b.error}"
                              for b in (svc.backends.values() if svc else ()) if b.error]
        except (XdpfwError, sqlite3.Error, OSError) as e:  # e.g. an id held for another
            return f"service {sid}: {e}", []
        return None, unresolved

    def _apply(self, sid: int, want: FleetService | None) -> None:
        have = self.lb.services.get(sid)
        if have is not None and (want is None or _definition(have) != _definition_of(want)):
            self.lb.delete_service(sid)
            have = None
        if want is None:
            return
        if have is None:
            for other in list(self.lb.services.values()):  # etcd's id wins a VIP:port
                r = other.rec
                if (r.vip, r.port, r.proto) == (want.spec.vip, want.spec.port, want.spec.proto):
                    self.lb.delete_service(r.id)
            self.lb.create_service(want.spec, want.ids)
            return
        wanted = dict(zip(want.ids.backends, want.spec.backends, strict=True))
        for bid, be in list(have.backends.items()):
            w = wanted.get(bid)
            if w is None or w.address != be.rec.address:
                self.lb.delete_backend(sid, bid)
        for bid, w in wanted.items():
            be = have.backends.get(bid)
            if be is None:
                self.lb.add_backend(sid, w, backend_id=bid)
            elif (be.rec.weight, be.rec.state) != (w.weight, w.state):
                self.lb.update_backend(sid, bid, w.weight, w.state)


def _definition(svc: ServiceState) -> tuple:
    r = svc.rec
    return r.name, r.vip, r.port, r.proto, r.forward, tuple(r.cpu_steer), r.health


def _definition_of(fs: FleetService) -> tuple:
    s = fs.spec
    return s.name, s.vip, s.port, s.proto, s.forward, tuple(s.cpu_steer), s.health
