"""The load balancer's services and backends: what they are, on disk and in the data plane.

Every change goes: validate -> resolve backend MACs -> DB transaction -> publish (the maps,
publish.py; or the proxy engine, proxies.py) -> commit. If anything fails, the commit
included, memory and maps are put back as they were, so a request takes full effect and is
on disk, or changes nothing. One exception: a proxy service's engine stops only once its
deletion is committed, so a failed delete does not cut its connections.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from xdpfw.dataplane.dataplane import Dataplane
from xdpfw.errors import ConflictError, NotFoundError
from xdpfw.lb.health import Backend as ProbeTarget
from xdpfw.lb.health import HealthCheckConfig
from xdpfw.lb.model import (
    BackendSpec,
    BackendState,
    ServiceSpec,
    ServiceState,
    check_backend,
    check_cpus,
    check_service,
    normalize_address,
)
from xdpfw.lb.neigh import Neighbour, NeighbourUnresolved, resolve
from xdpfw.lb.proxies import ProxyServices
from xdpfw.lb.publish import MaglevPublisher
from xdpfw.lb.store import BackendRecord, LbStore, ServiceRecord
from xdpfw.proxy.fallback import RequestedMode
from xdpfw.proxy.limits import ProxyLimits
from xdpfw.slots import SlotAllocator

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FleetIds:
    """A fleet's ids for a service and its backends (in the spec's order)."""

    service: int
    backends: tuple[int, ...]


class ServiceRegistry:
    def __init__(self, dp: Dataplane, store_path: Path, netns: str | None = None, *,
                 resolve_timeout_s: float = 2.0, proxy_mode: RequestedMode = "auto",
                 proxy_limits: ProxyLimits | None = None) -> None:
        """netns: where backends are reached ([lb].netns)."""
        self.lock = threading.RLock()
        self.netns = netns
        self.max_cpus = dp.config.max_cpus
        self.resolve_timeout_s = resolve_timeout_s
        self.store = LbStore(store_path)
        self.publisher = MaglevPublisher(dp.lb, dp.config, netns)
        self.proxies = ProxyServices(dp, netns, proxy_mode, proxy_limits or ProxyLimits())
        self.services: dict[int, ServiceState] = {}
        self.steer: tuple[int, ...] = ()
        records = self.store.load_services()
        backends = self.store.load_backends()
        self.service_slots = SlotAllocator(dp.config.max_services, (r.slot for r in records))
        self.backend_slots = SlotAllocator(dp.config.max_backends, (b.slot for b in backends))
        self._restore(records, backends)

    def close(self) -> None:
        """Stop the control plane; the data plane keeps balancing with the maps as they are.
        Proxy services stop: their engines live in this process."""
        with self.lock:
            self.proxies.close()
        self.store.close()

    # -- start-up -------------------------------------------------------------------------

    def _restore(self, records: list[ServiceRecord], backends: list[BackendRecord]) -> None:
        """Make the (pinned) LB maps equal to the store. Backend slots and generations are the
        stored ones, so conntrack entries of a previous run keep their flows."""
        steer = self.store.get_setting("cpu_steer")
        self.steer = tuple(int(c) for c in steer.split(",") if c)
        with self.lock:
            for rec in records:
                svc = ServiceState(rec)
                for b in backends:
                    if b.service_id == rec.id:
                        be = svc.backends[b.id] = BackendState(b)
                        if svc.proxied:
                            continue
                        self._resolve_into(be, timeout_s=min(1.0, self.resolve_timeout_s))
                        if be.error:
                            log.error("service %d backend %s: %s", rec.id, b.address, be.error)
                self.services[rec.id] = svc
                self._publish(svc)
            self.publisher.remove_other_vips(self.services.values())
            self._write_config()
        log.info("restored %d services, %d backends", len(records), len(backends))

    # -- services -------------------------------------------------------------------------

    def create_service(self, spec: ServiceSpec, ids: FleetIds | None = None) -> ServiceState:
        """ids: a fleet's service and backend ids (the same on every node), and the fleet's
        leniency: a backend whose MAC this node cannot resolve is kept unresolved (its
        `error` says why; the refresher tries again) instead of refusing the service, and a
        proxy service that cannot listen here is kept with its error (proxy status)."""
        vip = normalize_address(spec.vip, "vip")
        check_service(spec, self.max_cpus)
        with self.lock:
            for s in self.services.values():
                if (s.rec.vip, s.rec.port, s.rec.proto) == (vip, spec.port, spec.proto):
                    raise ConflictError(
                        f"service {vip} {spec.proto} port {spec.port} exists already "
                        f"(id {s.rec.id})"
                    )
            addresses = [normalize_address(b.address, "backend address") for b in spec.backends]
            if len(set(addresses)) != len(addresses):
                raise ConflictError("a backend address appears twice in this request")
            neighbours = [(None, None) if spec.forward == "proxy"
                          else self._neighbour(a, lenient=ids is not None) for a in addresses]
            if spec.forward == "proxy":
                self.proxies.prepare()
            slot = self.service_slots.take(1, "services")[0]
            bslots = self.backend_slots.take(len(addresses), "backends")
            rec = ServiceRecord(ids.service if ids else 0, spec.name, vip, spec.port,
                                spec.proto, spec.forward, tuple(spec.cpu_steer), spec.health,
                                slot)
            bids = ids.backends if ids else (None,) * len(addresses)
            svc: ServiceState | None = None
            try:
                with self.store.transaction():
                    rec = replace(rec, id=self.store.insert_service(rec))
                    svc = ServiceState(rec)
                    for b, addr, (n, err), bslot, want in zip(
                            spec.backends, addresses, neighbours, bslots, bids, strict=True):
                        bid = self.store.insert_backend(rec.id, addr, b.weight, b.state, bslot,
                                                        want)
                        svc.backends[bid] = BackendState(
                            BackendRecord(bid, rec.id, addr, b.weight, b.state, bslot), n, err
                        )
                    self.services[rec.id] = svc
                    self._publish(svc, fresh=True, strict=ids is None)
                    self._write_config()
            except BaseException:
                if svc is not None:
                    self._unpublish(svc)
                    self.services.pop(svc.rec.id, None)
                    self._write_config()
                self.service_slots.give([slot])
                self.backend_slots.give(bslots)
                raise
        return svc

    def delete_service(self, service_id: int) -> ServiceState:
        with self.lock:
            svc = self.get_service(service_id)
            try:
                with self.store.transaction():
                    self.store.delete_service(service_id)
                    if not svc.proxied:
                        self.publisher.unpublish(svc)
                    self._write_config(without=svc)
            except BaseException:
                if not svc.proxied:
                    self.publisher.publish(svc)  # as restored: its counters kept
                self._write_config()
                raise
            del self.services[service_id]
            if svc.proxied:  # committed: only now may its connections be cut
                self.proxies.stop(service_id)
                self.publisher.unpublish(svc)
            self.service_slots.give([svc.rec.slot])
            self.backend_slots.give(b.rec.slot for b in svc.backends.values())
        return svc

    def get_service(self, service_id: int) -> ServiceState:
        svc = self.services.get(service_id)
        if svc is None:
            raise NotFoundError(f"no service with id {service_id}")
        return svc

    def list_services(self) -> list[ServiceState]:
        return list(self.services.values())

    # -- backends -------------------------------------------------------------------------

    def add_backend(self, service_id: int, spec: BackendSpec,
                    backend_id: int | None = None) -> BackendState:
        """backend_id: a fleet's (the same on every node), added as leniently as
        create_service adds a fleet's backends."""
        address = normalize_address(spec.address, "backend address")
        check_backend(spec)
        with self.lock:
            svc = self.get_service(service_id)
            if svc.by_address(address) is not None:
                raise ConflictError(f"service {service_id} has backend {address} already")
            neighbour, error = (None, None) if svc.proxied else self._neighbour(
                address, lenient=backend_id is not None)
            slot = self.backend_slots.take(1, "backends")[0]
            be: BackendState | None = None
            try:
                with self.store.transaction():
                    bid = self.store.insert_backend(service_id, address, spec.weight,
                                                    spec.state, slot, backend_id)
                    be = BackendState(
                        BackendRecord(bid, service_id, address, spec.weight, spec.state, slot),
                        neighbour, error,
                    )
                    svc.backends[bid] = be
                    self.publisher.add_backend(svc, be)
            except BaseException:
                if be is not None and svc.backends.pop(be.rec.id, None) is not None:
                    self.publisher.recompute(svc)
                self.publisher.clear_backend(slot)
                self.backend_slots.give([slot])
                raise
        return be

    def update_backend(self, service_id: int, backend_id: int, weight: int | None = None,
                       state: str | None = None) -> BackendState:
        with self.lock:
            svc = self.get_service(service_id)
            be = self.get_backend(svc, backend_id)
            old = be.rec
            new = replace(old, weight=old.weight if weight is None else weight,
                          state=old.state if state is None else state)
            check_backend(BackendSpec(new.address, new.weight, new.state))
            try:
                with self.store.transaction():
                    self.store.update_backend(backend_id, new.weight, new.state)
                    be.rec = new
                    self.publisher.recompute(svc)
            except BaseException:
                be.rec = old
                self.publisher.recompute(svc)
                raise
            return be

    def delete_backend(self, service_id: int, backend_id: int) -> BackendState:
        with self.lock:
            svc = self.get_service(service_id)
            be = self.get_backend(svc, backend_id)
            try:
                with self.store.transaction():
                    self.store.delete_backend(backend_id)
                    del svc.backends[backend_id]
                    self.publisher.remove_backend(svc, be)
            except BaseException:
                svc.backends[backend_id] = be
                self.publisher.write_backend(svc, be)  # the same generation: flows stay
                self.publisher.recompute(svc)
                raise
            self.backend_slots.give([be.rec.slot])
        return be

    def get_backend(self, svc: ServiceState, backend_id: int) -> BackendState:
        be = svc.backends.get(backend_id)
        if be is None:
            raise NotFoundError(f"service {svc.rec.id} has no backend with id {backend_id}")
        return be

    # -- CPU steering of all passing traffic ----------------------------------------------

    def set_steer(self, cpus: Sequence[int]) -> tuple[int, ...]:
        cpus = tuple(cpus)
        check_cpus(cpus, self.max_cpus)
        with self.lock:
            old = self.steer
            try:
                with self.store.transaction():
                    self.store.set_setting("cpu_steer", ",".join(map(str, cpus)))
                    self.steer = cpus
                    self._write_config()
            except BaseException:
                self.steer = old
                self._write_config()
                raise
        return cpus

    # -- what the watcher reports ---------------------------------------------------------

    def health_targets(self, service_id: int) -> tuple[HealthCheckConfig, list[ProbeTarget]] | None:
        """What to probe for a service: its check and backends; None: nothing."""
        with self.lock:
            svc = self.services.get(service_id)
            if svc is None or svc.rec.health is None:
                return None
            spec = svc.rec.health
            return spec.config, [
                ProbeTarget(b.rec.address, b.rec.address, spec.port or svc.rec.port)
                for b in svc.backends.values()
            ]

    def set_health(self, service_id: int, address: str, healthy: bool,
                   error: str | None) -> None:
        with self.lock:
            svc = self.services.get(service_id)
            be = svc.by_address(address) if svc else None
            if be is None or be.healthy == healthy:
                return
            be.healthy = healthy
            be.health_error = None if healthy else error
            self.publisher.recompute(svc)
            log.info("service %d: backend %s %s the Maglev table", service_id, address,
                     "back in" if healthy else "taken out of")

    def xdp_backends(self) -> list[tuple[int, int]]:
        """(service id, backend id) of every backend XDP forwards to (they have a MAC)."""
        with self.lock:
            return [(s.rec.id, b.rec.id) for s in self.services.values()
                    if not s.proxied for b in s.backends.values()]

    def refresh_backend(self, service_id: int, backend_id: int) -> None:
        """Resolve a backend's next hop again, and rewrite it if it changed."""
        with self.lock:
            svc = self.services.get(service_id)
            be = svc.backends.get(backend_id) if svc else None
            if be is None or svc.proxied:
                return
            before = (be.neighbour.lladdr, be.neighbour.ifindex) if be.neighbour else None
            self._resolve_into(be, timeout_s=self.resolve_timeout_s)
            after = (be.neighbour.lladdr, be.neighbour.ifindex) if be.neighbour else None
            if after != before:
                log.info("service %d backend %s: next hop %s -> %s", service_id,
                         be.rec.address, before, after)
                self.publisher.write_backend(svc, be)
                self.publisher.recompute(svc)

    # -- internals ------------------------------------------------------------------------

    def _publish(self, svc: ServiceState, fresh: bool = False, strict: bool | None = None
                 ) -> None:
        """fresh: a new service (its counters start at zero; its failures raise unless
        strict is False); else a restored one."""
        self.publisher.publish(svc, fresh)
        if svc.proxied:
            self.proxies.start(svc, strict=fresh if strict is None else strict)

    def _unpublish(self, svc: ServiceState) -> None:
        if svc.proxied:
            self.proxies.stop(svc.rec.id)
        self.publisher.unpublish(svc)

    def _write_config(self, without: ServiceState | None = None) -> None:
        services = (s for s in self.services.values() if s is not without)
        self.publisher.write_config(services, self.steer)

    def _neighbour(self, address: str, lenient: bool) -> tuple[Neighbour | None, str | None]:
        """A new backend's next hop, and why there is none. Not lenient: NeighbourUnresolved
        (a BackendUnresolvedError) refuses the request."""
        try:
            return resolve(address, self.netns, timeout_s=self.resolve_timeout_s), None
        except NeighbourUnresolved as e:
            if not lenient:
                raise
            log.warning("backend %s: %s", address, e)
            return None, str(e)

    def _resolve_into(self, be: BackendState, timeout_s: float) -> None:
        try:
            be.neighbour = resolve(be.rec.address, self.netns, timeout_s=timeout_s)
            be.error = None
        except NeighbourUnresolved as e:
            be.neighbour = None
            be.error = str(e)
