"""The load balancer's control plane: services and backends -> Maglev rows in the data plane.

Every change goes: validate -> resolve backend MACs -> DB transaction -> write the maps ->
commit. Order of map writes, for packets in flight: a backend's entry exists before any table
row points at it; a row stops pointing at a backend before its entry is cleared; a service's
row is complete before its VIP entry appears.

A backend is in its service's Maglev table when it is `active`, has weight, has a resolved MAC,
and (with health checks) is healthy. `draining` keeps its established flows (conntrack) but
takes no new ones; deleting a backend clears its slot, so its flows are re-balanced.

Forward mode `proxy` is different: the service never enters the XDP maps (its packets pass to
the stack), and a ProxyEngine per service listens on VIP:port in [lb].netns, picks a backend
from the same Maglev table (pick_backend) and splices the two sockets in the kernel (sockhash),
or relays in user space when the kernel refuses the programs. Its backends need no MAC: they
may sit behind a router. All proxy services share one SockProxyDataplane, loaded on first use.

Health checks and MAC refreshes run on one thread with its own asyncio loop (`start()`): the
probes must leave from the backends' network namespace, and that is a per-thread property
(setns), so they cannot share uvicorn's thread; and the callbacks do blocking map writes and
Maglev builds, which must not stall the API's event loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from xdpfw.dataplane import abi
from xdpfw.dataplane.lb_maps import Vip
from xdpfw.errors import (
    BackendUnresolvedError,
    ConflictError,
    NotFoundError,
    ServiceValidationError,
)
from xdpfw.lb.health import Backend as ProbeTarget
from xdpfw.lb.health import HealthChecker
from xdpfw.lb.maglev import build_table
from xdpfw.lb.neigh import Neighbour, NeighbourUnresolved, resolve
from xdpfw.lb.store import BackendRecord, HealthSpec, LbStore, ServiceRecord
from xdpfw.netns import link_mac, thread_in_netns
from xdpfw.proxy.engine import EngineError, ProxyEngine, ServiceCounters
from xdpfw.proxy.fallback import ProxyUnavailableError
from xdpfw.proxy.loader import SockProxyDataplane

log = logging.getLogger(__name__)

FORWARD = {"tx": abi.LB_FWD_TX, "redirect": abi.LB_FWD_REDIRECT}  # modes XDP forwards
FORWARD_MODES = (*FORWARD, "proxy")
BACKEND_STATES = ("active", "draining")


@dataclass(frozen=True)
class BackendSpec:
    address: str
    weight: int = 1
    state: str = "active"


@dataclass(frozen=True)
class ServiceSpec:
    vip: str
    port: int
    proto: str = "tcp"
    forward: str = "tx"
    name: str = ""
    cpu_steer: tuple[int, ...] = ()
    health: HealthSpec | None = None
    backends: tuple[BackendSpec, ...] = ()


@dataclass
class BackendState:
    rec: BackendRecord
    neighbour: Neighbour | None = None
    error: str | None = None  # why the MAC is unresolved
    healthy: bool = True  # health checks start optimistic (see start())
    health_error: str | None = None

    @property
    def usable(self) -> bool:
        return self.neighbour is not None


@dataclass
class ServiceState:
    rec: ServiceRecord
    backends: dict[int, BackendState] = field(default_factory=dict)
    row: list[int] = field(default_factory=list)  # backend slot per table position, as written
    # proxy: backend address per table position (None: no backend), replaced whole on every
    # recompute so the engine's thread reads it without the lock; the engine, or why none runs.
    proxy_table: tuple[str | None, ...] = ()
    engine: ProxyEngine | None = None
    engine_error: str | None = None

    @property
    def proxied(self) -> bool:
        return self.rec.forward == "proxy"

    def by_address(self, address: str) -> BackendState | None:
        return next((b for b in self.backends.values() if b.rec.address == address), None)


def normalize_address(text: str, what: str) -> str:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise ServiceValidationError(f"{what} {text!r} is not an IP address") from None


class LoadBalancer:
    def __init__(
        self,
        firewall,
        netns: str | None = None,
        *,
        resolve_timeout_s: float = 2.0,
        refresh_s: float = 10.0,
        proxy_mode: str = "auto",
    ) -> None:
        from xdpfw.service import SlotAllocator  # the firewall's allocator, same semantics

        self.lock = threading.RLock()
        self.netns = netns
        self.config = firewall.config
        self.table_size = firewall.config.lb_table_size
        self.maps = firewall.dp.lb  # handles on the pins: valid across upgrades
        self.store = LbStore(firewall.store.path)
        self.resolve_timeout_s = resolve_timeout_s
        self.refresh_s = refresh_s
        self.services: dict[int, ServiceState] = {}
        self.ports: dict[int, int] = {}  # egress ifindex -> tx_ports key
        self.cpus_enabled: set[int] = set()
        self.steer: tuple[int, ...] = ()
        records = self.store.load_services()
        backends = self.store.load_backends()
        self.service_slots = SlotAllocator(self.config.max_services, (r.slot for r in records))
        self.backend_slots = SlotAllocator(self.config.max_backends, (b.slot for b in backends))
        self.checker = HealthChecker(self._on_health, initial_healthy=True)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.dp = firewall.dp
        self.proxy_mode = proxy_mode  # "auto" | "sockhash" | "userspace" (see proxy/fallback.py)
        self.proxy_fallback: str | None = None  # why proxy services relay in user space
        self._restore(records, backends)

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
                self._publish_service(svc)
            wanted = {self._vip(s.rec).key() for s in self.services.values() if not s.proxied}
            for key in self.maps.service_entries():
                if key not in wanted:
                    self.maps.services.delete(key)
            self._write_config()
        log.info("restored %d services, %d backends", len(records), len(backends))

    # -- health-check thread --------------------------------------------------------------

    def start(self) -> None:
        """Start health checks and MAC refreshes on their own thread (see the module doc)."""
        if self._thread is not None:
            return
        ready = threading.Event()
        failure: list[BaseException] = []

        def main() -> None:
            loop = asyncio.new_event_loop()
            try:
                with thread_in_netns(self.netns):
                    asyncio.set_event_loop(loop)
                    self._loop = loop
                    loop.run_until_complete(self.checker.start())
                    # Inside the running loop: the checker refuses calls from outside it.
                    for sid in list(self.services):
                        loop.call_soon(self._apply_health, sid)
                    refresher = loop.create_task(self._refresh_loop())
                    ready.set()
                    loop.run_forever()
                    refresher.cancel()
                    loop.run_until_complete(asyncio.gather(refresher, return_exceptions=True))
                    loop.run_until_complete(self.checker.stop())
            except BaseException as e:
                failure.append(e)
                ready.set()
            finally:
                self._loop = None
                loop.close()

        self._thread = threading.Thread(target=main, name="xdpfw-lb-health", daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            self._thread = None
            raise failure[0]

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is not None:
            loop.call_soon_threadsafe(loop.stop)
        if thread is not None:
            thread.join(timeout=10)
        self._thread = None

    def close(self) -> None:
        """Stop the control plane; the data plane keeps balancing with the maps as they are.
        Proxy services stop: their engines live in this process."""
        self.stop()
        with self.lock:
            for svc in self.services.values():
                self._stop_engine(svc)
        self.store.close()

    def _sync_health(self, service_id: int) -> None:
        loop = self._loop
        if loop is not None:
            loop.call_soon_threadsafe(self._apply_health, service_id)

    def _apply_health(self, service_id: int) -> None:
        """On the loop thread: give the checker a service's current backends."""
        with self.lock:
            svc = self.services.get(service_id)
            if svc is None or svc.rec.health is None:
                self.checker.remove_service(str(service_id))
                return
            spec = svc.rec.health
            targets = [
                ProbeTarget(b.rec.address, b.rec.address, spec.port or svc.rec.port)
                for b in svc.backends.values()
            ]
        self.checker.set_service(str(service_id), spec.config, targets)

    def _on_health(self, service_id: str, address: str, healthy: bool) -> None:
        with self.lock:
            svc = self.services.get(int(service_id))
            be = svc.by_address(address) if svc else None
            if be is None or be.healthy == healthy:
                return
            be.healthy = healthy
            status = self.checker.status(service_id).get(address)
            be.health_error = status.last_error if status and not healthy else None
            self._recompute(svc)
            log.info("service %s: backend %s %s the Maglev table", service_id, address,
                     "back in" if healthy else "taken out of")

    async def _refresh_loop(self) -> None:
        """Re-resolve every backend's MAC: XDP traffic never confirms neighbour entries, and a
        backend can change NIC; unresolved backends get another try."""
        while True:
            await asyncio.sleep(self.refresh_s)
            with self.lock:
                todo = [(s.rec.id, b.rec.id) for s in self.services.values()
                        if not s.proxied for b in s.backends.values()]
            for sid, bid in todo:
                try:
                    await asyncio.to_thread(self.refresh_backend, sid, bid)
                except Exception:
                    log.exception("refreshing backend %d of service %d failed", bid, sid)

    def refresh_backend(self, service_id: int, backend_id: int) -> None:
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
                self._write_backend(svc, be)
                self._recompute(svc)

    # -- services -------------------------------------------------------------------------

    def create_service(self, spec: ServiceSpec) -> ServiceState:
        vip = normalize_address(spec.vip, "vip")
        self._check_spec(spec)
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
            neighbours = [None if spec.forward == "proxy" else self._resolve_or_raise(a)
                          for a in addresses]
            if spec.forward == "proxy":
                self._proxy_dataplane()  # a compile, once: before the DB transaction
            slot = self.service_slots.take(1, "services")[0]
            bslots = self.backend_slots.take(len(addresses), "backends")
            rec = ServiceRecord(0, spec.name, vip, spec.port, spec.proto, spec.forward,
                                tuple(spec.cpu_steer), spec.health, slot)
            svc: ServiceState | None = None
            try:
                with self.store.transaction():
                    rec = replace(rec, id=self.store.insert_service(rec))
                    svc = ServiceState(rec)
                    for b, addr, n, bslot in zip(spec.backends, addresses, neighbours, bslots,
                                                 strict=True):
                        bid = self.store.insert_backend(rec.id, addr, b.weight, b.state, bslot)
                        svc.backends[bid] = BackendState(
                            BackendRecord(bid, rec.id, addr, b.weight, b.state, bslot), n
                        )
                    self.maps.reset_service_counters(slot)
                    self.services[rec.id] = svc
                    self._publish_service(svc, fresh=True)
                    self._write_config()
            except BaseException:
                if svc is not None:
                    self._unpublish_service(svc)
                    self.services.pop(svc.rec.id, None)
                    self._write_config()
                self.service_slots.give([slot])
                self.backend_slots.give(bslots)
                raise
        self._sync_health(rec.id)
        return svc

    def delete_service(self, service_id: int) -> ServiceState:
        with self.lock:
            svc = self.get_service(service_id)
            with self.store.transaction():
                self.store.delete_service(service_id)
                self._unpublish_service(svc)
                del self.services[service_id]
                self._write_config()
            self.service_slots.give([svc.rec.slot])
            self.backend_slots.give(b.rec.slot for b in svc.backends.values())
        self._sync_health(service_id)
        return svc

    def get_service(self, service_id: int) -> ServiceState:
        svc = self.services.get(service_id)
        if svc is None:
            raise NotFoundError(f"no service with id {service_id}")
        return svc

    def list_services(self) -> list[ServiceState]:
        return list(self.services.values())

    # -- backends -------------------------------------------------------------------------

    def add_backend(self, service_id: int, spec: BackendSpec) -> BackendState:
        address = normalize_address(spec.address, "backend address")
        self._check_backend(spec)
        with self.lock:
            svc = self.get_service(service_id)
            if svc.by_address(address) is not None:
                raise ConflictError(f"service {service_id} has backend {address} already")
            neighbour = None if svc.proxied else self._resolve_or_raise(address)
            slot = self.backend_slots.take(1, "backends")[0]
            be: BackendState | None = None
            try:
                with self.store.transaction():
                    bid = self.store.insert_backend(service_id, address, spec.weight,
                                                    spec.state, slot)
                    be = BackendState(
                        BackendRecord(bid, service_id, address, spec.weight, spec.state, slot),
                        neighbour,
                    )
                    svc.backends[bid] = be
                    self.maps.reset_backend_counters(slot)
                    self._write_backend(svc, be)
                    self._recompute(svc)
            except BaseException:
                if be is not None and svc.backends.pop(be.rec.id, None) is not None:
                    self._recompute(svc)
                self.maps.clear_backend(slot)
                self.backend_slots.give([slot])
                raise
        self._sync_health(service_id)
        return be

    def update_backend(self, service_id: int, backend_id: int, weight: int | None = None,
                       state: str | None = None) -> BackendState:
        with self.lock:
            svc = self.get_service(service_id)
            be = self.get_backend(svc, backend_id)
            new = replace(be.rec, weight=be.rec.weight if weight is None else weight,
                          state=be.rec.state if state is None else state)
            self._check_backend(BackendSpec(new.address, new.weight, new.state))
            old = be.rec
            with self.store.transaction():
                self.store.update_backend(backend_id, new.weight, new.state)
                be.rec = new
                try:
                    self._recompute(svc)
                except BaseException:
                    be.rec = old
                    self._recompute(svc)
                    raise
            return be

    def delete_backend(self, service_id: int, backend_id: int) -> BackendState:
        with self.lock:
            svc = self.get_service(service_id)
            be = self.get_backend(svc, backend_id)
            with self.store.transaction():
                self.store.delete_backend(backend_id)
                del svc.backends[backend_id]
                self._recompute(svc)  # no row points at it any more ...
                self.maps.clear_backend(be.rec.slot)  # ... then its flows are re-balanced
            self.backend_slots.give([be.rec.slot])
        self._sync_health(service_id)
        return be

    def get_backend(self, svc: ServiceState, backend_id: int) -> BackendState:
        be = svc.backends.get(backend_id)
        if be is None:
            raise NotFoundError(f"service {svc.rec.id} has no backend with id {backend_id}")
        return be

    # -- CPU steering of all passing traffic ----------------------------------------------

    def set_steer(self, cpus: Sequence[int]) -> tuple[int, ...]:
        cpus = tuple(cpus)
        self._check_cpus(cpus)
        with self.lock, self.store.transaction():
            self.store.set_setting("cpu_steer", ",".join(map(str, cpus)))
            self.steer = cpus
            self._write_config()
        return cpus

    # -- views ----------------------------------------------------------------------------

    def share(self, svc: ServiceState, be: BackendState) -> float:
        if not svc.row:
            return 0.0
        return svc.row.count(be.rec.slot) / len(svc.row)

    def counters(self, svc: ServiceState) -> dict[str, tuple[int, int]]:
        return self.maps.service_totals(svc.rec.slot)

    def backend_counters(self, be: BackendState) -> tuple[int, int]:
        return self.maps.backend_totals(be.rec.slot)

    def proxy_status(self, svc: ServiceState) -> tuple[str | None, str | None,
                                                         ServiceCounters | None]:
        """(mode in use, why it is not sockhash, the engine's counters) of a proxy service;
        the mode is None when no engine runs (svc.engine_error says why)."""
        eng = svc.engine
        if eng is None:
            return None, None, None
        reason = eng.fallback_reason or (self.proxy_fallback if eng.mode == "userspace"
                                         else None)
        return eng.mode, reason, eng.counters()

    # -- internals ------------------------------------------------------------------------

    def _vip(self, rec: ServiceRecord) -> Vip:
        return Vip(rec.vip, rec.port, rec.proto)

    def _check_spec(self, spec: ServiceSpec) -> None:
        if spec.proto not in ("tcp", "udp"):
            raise ServiceValidationError(f"proto must be tcp or udp, got {spec.proto!r}")
        if spec.forward not in FORWARD_MODES:
            raise ServiceValidationError(
                f"forward must be tx, redirect or proxy, got {spec.forward!r}")
        if spec.forward == "proxy" and spec.proto != "tcp":
            raise ServiceValidationError("forward proxy takes tcp services only")
        if spec.forward == "proxy" and spec.cpu_steer:
            raise ServiceValidationError(
                "cpu_steer does not apply to forward proxy: XDP passes its packets untouched")
        if not 0 < spec.port < 65536:
            raise ServiceValidationError(f"port {spec.port} out of 1..65535")
        self._check_cpus(spec.cpu_steer)
        for b in spec.backends:
            self._check_backend(b)

    @staticmethod
    def _check_backend(spec: BackendSpec) -> None:
        if spec.state not in BACKEND_STATES:
            raise ServiceValidationError(f"state must be active or draining, got {spec.state!r}")
        if not 0 <= spec.weight <= 1000:
            raise ServiceValidationError(f"weight {spec.weight} out of 0..1000")

    def _check_cpus(self, cpus: Sequence[int]) -> None:
        limit = min(os.cpu_count() or 1, self.config.max_cpus)
        if len(cpus) > abi.LB_MAX_STEER_CPUS:
            raise ServiceValidationError(
                f"cpu_steer takes at most {abi.LB_MAX_STEER_CPUS} CPUs, got {len(cpus)}"
            )
        bad = [c for c in cpus if not 0 <= c < limit]
        if bad:
            raise ServiceValidationError(f"cpu_steer: no CPU {bad} here (CPUs 0..{limit - 1})")
        if len(set(cpus)) != len(cpus):
            raise ServiceValidationError("cpu_steer lists a CPU twice")

    def _enable_cpus(self, cpus: Sequence[int]) -> None:
        for c in cpus:
            if c not in self.cpus_enabled:
                self.maps.set_cpu(c)
                self.cpus_enabled.add(c)

    def _resolve(self, address: str, timeout_s: float) -> Neighbour:
        return resolve(address, self.netns, timeout_s=timeout_s)

    def _resolve_or_raise(self, address: str) -> Neighbour:
        try:
            return self._resolve(address, self.resolve_timeout_s)
        except NeighbourUnresolved as e:
            where = f" in netns {self.netns}" if self.netns else ""
            raise BackendUnresolvedError(
                f"backend {address}: {e}{where}; nothing was changed (its MAC comes from the "
                "neighbour table: the backend must answer ARP/ND)"
            ) from None

    def _resolve_into(self, be: BackendState, timeout_s: float) -> None:
        try:
            be.neighbour = self._resolve(be.rec.address, timeout_s)
            be.error = None
        except NeighbourUnresolved as e:
            be.neighbour = None
            be.error = str(e)

    def _port_for(self, ifindex: int) -> int:
        port = self.ports.get(ifindex)
        if port is None:
            port = len(self.ports)
            if port >= self.config.max_ifaces:
                raise ConflictError(f"no tx_ports entry left for ifindex {ifindex}")
            # The kernel resolves a devmap's ifindex in the writer's namespace.
            with thread_in_netns(self.netns):
                self.maps.set_tx_port(port, ifindex)
            self.ports[ifindex] = port
        return port

    def _write_backend(self, svc: ServiceState, be: BackendState) -> None:
        if svc.proxied:
            return  # proxied backends are reached by connect(), not by XDP
        n = be.neighbour
        if n is None:
            self.maps.clear_backend(be.rec.slot)
            return
        port = self._port_for(n.ifindex) if svc.rec.forward == "redirect" else 0
        smac = link_mac(self.netns, n.ifname)
        # The generation is the backend's id: unique forever, stable across restarts.
        self.maps.set_backend(be.rec.slot, n.lladdr, smac, port, gen=be.rec.id)

    def _in_table(self, svc: ServiceState, be: BackendState) -> int:
        ok = be.rec.state == "active" and (be.usable or svc.proxied)
        if svc.rec.health is not None:
            ok = ok and be.healthy
        return be.rec.weight if ok else 0

    def _recompute(self, svc: ServiceState, full: bool = False) -> None:
        """Rebuild the Maglev table and write the positions that changed."""
        bes = sorted(svc.backends.values(), key=lambda b: b.rec.id)
        table = build_table([(b.rec.address, self._in_table(svc, b)) for b in bes],
                            self.table_size)
        row = [bes[i].rec.slot if i >= 0 else abi.LB_NO_BACKEND for i in table]
        if svc.proxied:
            svc.proxy_table = tuple(bes[i].rec.address if i >= 0 else None for i in table)
            svc.row = row
            return
        if full or len(svc.row) != len(row):
            self.maps.write_row(svc.rec.slot, row)
        else:
            changed = {i: v for i, (old, v) in enumerate(zip(svc.row, row, strict=True))
                       if old != v}
            if changed:
                self.maps.write_row(svc.rec.slot, changed)
        svc.row = row

    def _publish_service(self, svc: ServiceState, fresh: bool = False) -> None:
        for be in svc.backends.values():
            if fresh:
                self.maps.reset_backend_counters(be.rec.slot)
            self._write_backend(svc, be)
        self._recompute(svc, full=True)
        if svc.proxied:
            # No lb_services entry: XDP passes the VIP's packets to the engine's socket.
            self._start_engine(svc, strict=fresh)
            return
        self._enable_cpus(svc.rec.cpu_steer)
        self.maps.set_service(self._vip(svc.rec), svc.rec.slot, FORWARD[svc.rec.forward],
                              svc.rec.cpu_steer)

    def _unpublish_service(self, svc: ServiceState) -> None:
        if svc.proxied:
            self._stop_engine(svc)
            svc.row, svc.proxy_table = [], ()
            return
        self.maps.del_service(self._vip(svc.rec))
        self.maps.write_row(svc.rec.slot, [abi.LB_NO_BACKEND] * self.table_size)
        for be in svc.backends.values():
            self.maps.clear_backend(be.rec.slot)
        svc.row = []

    def _write_config(self) -> None:
        self._enable_cpus(self.steer)
        xdp = sum(1 for s in self.services.values() if not s.proxied)
        self.maps.set_config(xdp, self.steer)

    # -- forward proxy --------------------------------------------------------------------

    def _proxy_dataplane(self) -> SockProxyDataplane | None:
        """The sockproxy programs all proxy services share (Dataplane.proxy); None when they
        relay in user space (configured, or the kernel refused; proxy_fallback says)."""
        dp, self.proxy_fallback = self.dp.proxy(self.proxy_mode)
        return dp

    def _picker(self, svc: ServiceState):
        """pick_backend for svc's engine: the client's 5-tuple hashed into the Maglev table.

        Runs on the engine's thread without the lock: it reads svc.proxy_table, which
        _recompute replaces whole. blake2b, not the kernel's jhash: proxied flows never take
        the XDP path, so only stability matters.
        """
        vip, port = svc.rec.vip, svc.rec.port

        def pick(client: tuple[str, int]) -> tuple[str, int]:
            table = svc.proxy_table
            if not table:
                raise LookupError("service has no Maglev table")
            key = f"{client[0]}|{client[1]}|{vip}|{port}|tcp".encode()
            h = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")
            address = table[h % len(table)]
            if address is None:
                raise LookupError("no usable backend (none active, weighted and healthy)")
            return address, port

        return pick

    def _start_engine(self, svc: ServiceState, strict: bool) -> None:
        """Listen on VIP:port in [lb].netns. strict (a new service): failures raise; else
        (restore) they are logged and kept in svc.engine_error, and the rest goes on."""
        try:
            dp = self._proxy_dataplane()
            engine = ProxyEngine(svc.rec.vip, svc.rec.port, self._picker(svc), svc.rec.id,
                                 mode="userspace" if dp is None else "sockhash", dataplane=dp,
                                 netns=self.netns)
            engine.start()
        except (ProxyUnavailableError, EngineError) as e:
            if strict:
                raise
            svc.engine_error = str(e)
            log.error("service %d: %s", svc.rec.id, e)
            return
        svc.engine, svc.engine_error = engine, None

    def _stop_engine(self, svc: ServiceState) -> None:
        if svc.engine is not None:
            svc.engine.stop()
            svc.engine = None
