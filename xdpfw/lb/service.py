"""The load balancer as the API and the daemon see it: services and backends whose health and
next hops are watched on a thread of its own.

- model.py: specs, states and their validation;
- registry.py: CRUD, the store, and what each change publishes (all or nothing);
- publish.py: Maglev tables and every other LB map write;
- proxies.py: forward mode `proxy`, a ProxyEngine per service;
- watcher.py: the health-check and MAC-refresh thread.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from xdpfw.dataplane.dataplane import Dataplane
from xdpfw.lb.model import BackendSpec, BackendState, ServiceSpec, ServiceState
from xdpfw.lb.proxies import ProxyStatus
from xdpfw.lb.registry import FleetIds, ServiceRegistry
from xdpfw.lb.watcher import BackendWatcher
from xdpfw.proxy.fallback import RequestedMode
from xdpfw.proxy.limits import ProxyLimits
from xdpfw.statedir import store_path


class LoadBalancer:
    def __init__(
        self,
        state_dir: Path | str,
        dataplane: Dataplane,
        netns: str | None = None,
        *,
        resolve_timeout_s: float = 2.0,
        refresh_s: float = 10.0,
        proxy_mode: RequestedMode = "auto",
        proxy_limits: ProxyLimits | None = None,
    ) -> None:
        """state_dir: the firewall's (one store file); netns: where backends are reached."""
        self.registry = ServiceRegistry(dataplane, store_path(state_dir), netns,
                                        resolve_timeout_s=resolve_timeout_s,
                                        proxy_mode=proxy_mode,
                                        proxy_limits=proxy_limits)
        self.watcher = BackendWatcher(self.registry, netns, refresh_s)
        self.lock = self.registry.lock  # views of states are read under it
        self.maps = dataplane.lb
        self.table_size = dataplane.config.lb_table_size

    @property
    def services(self) -> dict[int, ServiceState]:
        return self.registry.services

    @property
    def steer(self) -> tuple[int, ...]:
        return self.registry.steer

    def start(self) -> None:
        """Start health checks and MAC refreshes (watcher.py)."""
        self.watcher.start()

    def close(self) -> None:
        """Stop the control plane; the data plane keeps balancing with the maps as they are.
        Proxy services stop: their engines live in this process."""
        self.watcher.stop()
        self.registry.close()

    # -- changes --------------------------------------------------------------------------

    def create_service(self, spec: ServiceSpec, ids: FleetIds | None = None) -> ServiceState:
        svc = self.registry.create_service(spec, ids)
        self.watcher.sync(svc.rec.id)
        return svc

    def delete_service(self, service_id: int) -> ServiceState:
        svc = self.registry.delete_service(service_id)
        self.watcher.sync(service_id)
        return svc

    def add_backend(self, service_id: int, spec: BackendSpec,
                    backend_id: int | None = None) -> BackendState:
        be = self.registry.add_backend(service_id, spec, backend_id)
        self.watcher.sync(service_id)
        return be

    def update_backend(self, service_id: int, backend_id: int, weight: int | None = None,
                       state: str | None = None) -> BackendState:
        return self.registry.update_backend(service_id, backend_id, weight, state)

    def delete_backend(self, service_id: int, backend_id: int) -> BackendState:
        be = self.registry.delete_backend(service_id, backend_id)
        self.watcher.sync(service_id)
        return be

    def set_steer(self, cpus: Sequence[int]) -> tuple[int, ...]:
        return self.registry.set_steer(cpus)

    # -- views (callers hold `lock` while they read the states) ---------------------------

    def get_service(self, service_id: int) -> ServiceState:
        return self.registry.get_service(service_id)

    def list_services(self) -> list[ServiceState]:
        return self.registry.list_services()

    def get_backend(self, svc: ServiceState, backend_id: int) -> BackendState:
        return self.registry.get_backend(svc, backend_id)

    def share(self, svc: ServiceState, be: BackendState) -> float:
        return svc.share(be)

    def counters(self, svc: ServiceState) -> dict[str, tuple[int, int]]:
        return self.maps.service_totals(svc.rec.slot)

    def backend_counters(self, be: BackendState) -> tuple[int, int]:
        return self.maps.backend_totals(be.rec.slot)

    def proxy_status(self, svc: ServiceState) -> ProxyStatus:
        """A proxy service's mode in use, why it is not sockhash (or why no engine runs), and
        its engine's counters."""
        return self.registry.proxies.status(svc)
