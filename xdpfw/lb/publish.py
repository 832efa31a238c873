"""The load balancer's state written into its maps (Dataplane.lb): backends' next hops, each
service's Maglev row and VIP entry, steering CPUs and lb_config.

Order of map writes, for packets in flight: a backend's entry exists before any table row
points at it; a row stops pointing at a backend before its entry is cleared; a service's row
is complete before its VIP entry appears.

A backend is in its service's Maglev table when it is `active`, has weight, has a resolved
MAC (proxy services need none), and (with health checks) is healthy. `draining` keeps its
established flows (conntrack) but takes no new ones; clearing a backend's entry re-balances
its flows.

A proxy service has a Maglev table too (its engine picks from it, proxies.py) but no entry
in the maps: XDP passes its packets to the stack.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from xdpfw.dataplane import abi
from xdpfw.dataplane.lb_maps import LbMaps, Vip
from xdpfw.dataplane.loader import ProgramConfig
from xdpfw.errors import ConflictError
from xdpfw.lb.maglev import build_table
from xdpfw.lb.model import FORWARD, BackendState, ServiceState
from xdpfw.lb.store import ServiceRecord
from xdpfw.netns import link_mac, thread_in_netns


def vip(rec: ServiceRecord) -> Vip:
    return Vip(rec.vip, rec.port, rec.proto)


def in_table(svc: ServiceState, be: BackendState) -> int:
    """The weight `be` gets in svc's Maglev table (0: none)."""
    ok = be.rec.state == "active" and (be.usable or svc.proxied)
    if svc.rec.health is not None:
        ok = ok and be.healthy
    return be.rec.weight if ok else 0


class MaglevPublisher:
    def __init__(self, maps: LbMaps, config: ProgramConfig, netns: str | None) -> None:
        """netns: where the backends' interfaces are ([lb].netns)."""
        self.maps = maps
        self.table_size = config.lb_table_size
        self.max_ifaces = config.max_ifaces
        self.netns = netns
        self.ports: dict[int, int] = {}  # egress ifindex -> tx_ports key
        self.cpus_enabled: set[int] = set()

    # -- services -------------------------------------------------------------------------

    def publish(self, svc: ServiceState, fresh: bool = False) -> None:
        """Write a service whole: backends, row, then VIP entry. fresh: a new service, whose
        counters start from zero (a restored one keeps its own)."""
        if fresh:
            self.maps.reset_service_counters(svc.rec.slot)
        for be in svc.backends.values():
            if fresh:
                self.maps.reset_backend_counters(be.rec.slot)
            self.write_backend(svc, be)
        self.recompute(svc, full=True)
        if svc.proxied:
            return
        self._enable_cpus(svc.rec.cpu_steer)
        self.maps.set_service(vip(svc.rec), svc.rec.slot, FORWARD[svc.rec.forward],
                              svc.rec.cpu_steer)

    def unpublish(self, svc: ServiceState) -> None:
        """Publish's reverse: VIP entry, then row, then backends."""
        if not svc.proxied:
            self.maps.del_service(vip(svc.rec))
            self.maps.write_row(svc.rec.slot, [abi.LB_NO_BACKEND] * self.table_size)
            for be in svc.backends.values():
                self.maps.clear_backend(be.rec.slot)
        svc.row, svc.proxy_table = [], ()

    def remove_other_vips(self, services: Iterable[ServiceState]) -> None:
        """Delete VIP entries no service here explains (start-up: the pins may be older)."""
        wanted = {vip(s.rec).key() for s in services if not s.proxied}
        for key in self.maps.service_entries():
            if key not in wanted:
                self.maps.del_service_key(key)
        self.maps.sync_vip_index()

    def write_config(self, services: Iterable[ServiceState], steer: Sequence[int]) -> None:
        """lb_config: how many services XDP forwards, and the CPUs passing traffic is
        steered to."""
        self._enable_cpus(steer)
        xdp = sum(1 for s in services if not s.proxied)
        self.maps.set_config(xdp, steer)

    # -- backends -------------------------------------------------------------------------

    def add_backend(self, svc: ServiceState, be: BackendState) -> None:
        """be is in svc.backends already: its entry first, then the row."""
        self.maps.reset_backend_counters(be.rec.slot)
        self.write_backend(svc, be)
        self.recompute(svc)

    def remove_backend(self, svc: ServiceState, be: BackendState) -> None:
        """be is out of svc.backends already: no row points at it any more, then its entry
        is cleared, so its flows are re-balanced."""
        self.recompute(svc)
        self.clear_backend(be.rec.slot)

    def clear_backend(self, slot: int) -> None:
        self.maps.clear_backend(slot)

    def write_backend(self, svc: ServiceState, be: BackendState) -> None:
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

    # -- the Maglev table -----------------------------------------------------------------

    def recompute(self, svc: ServiceState, full: bool = False) -> None:
        """Rebuild the Maglev table and write the positions that changed."""
        bes = sorted(svc.backends.values(), key=lambda b: b.rec.id)
        table = build_table([(b.rec.address, in_table(svc, b)) for b in bes], self.table_size)
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

    # -- egress ports and CPUs ------------------------------------------------------------

    def _port_for(self, ifindex: int) -> int:
        port = self.ports.get(ifindex)
        if port is None:
            port = len(self.ports)
            if port >= self.max_ifaces:
                raise ConflictError(f"no tx_ports entry left for ifindex {ifindex}")
            # The kernel resolves a devmap's ifindex in the writer's namespace.
            with thread_in_netns(self.netns):
                self.maps.set_tx_port(port, ifindex)
            self.ports[ifindex] = port
        return port

    def _enable_cpus(self, cpus: Sequence[int]) -> None:
        for c in cpus:
            if c not in self.cpus_enabled:
                self.maps.set_cpu(c)
                self.cpus_enabled.add(c)
