"""Services and backends as the load balancer holds them, and their validation.

A spec is what a request asks for; a state is what the registry keeps: the stored record,
the backend's next hop and health, and the service's Maglev table as written.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from xdpfw.dataplane import abi
from xdpfw.errors import ServiceValidationError
from xdpfw.lb.neigh import Neighbour
from xdpfw.lb.store import BackendRecord, HealthSpec, ServiceRecord

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
    healthy: bool = True  # health checks start optimistic (see BackendWatcher)
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
    # recompute so the engine's thread reads it without the lock.
    proxy_table: tuple[str | None, ...] = ()

    @property
    def proxied(self) -> bool:
        return self.rec.forward == "proxy"

    def by_address(self, address: str) -> BackendState | None:
        return next((b for b in self.backends.values() if b.rec.address == address), None)

    def share(self, be: BackendState) -> float:
        """The fraction of the Maglev table `be` owns: its expected share of new flows."""
        if not self.row:
            return 0.0
        return self.row.count(be.rec.slot) / len(self.row)


def normalize_address(text: str, what: str) -> str:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise ServiceValidationError(f"{what} {text!r} is not an IP address") from None


def check_service(spec: ServiceSpec, max_cpus: int) -> None:
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
    check_cpus(spec.cpu_steer, max_cpus)
    for b in spec.backends:
        check_backend(b)


def check_backend(spec: BackendSpec) -> None:
    if spec.state not in BACKEND_STATES:
        raise ServiceValidationError(f"state must be active or draining, got {spec.state!r}")
    if not 0 <= spec.weight <= 1000:
        raise ServiceValidationError(f"weight {spec.weight} out of 0..1000")


def check_cpus(cpus: Sequence[int], max_cpus: int) -> None:
    """max_cpus: the cpu_map's size; CPUs this machine does not have are refused too."""
    limit = min(os.cpu_count() or 1, max_cpus)
    if len(cpus) > abi.LB_MAX_STEER_CPUS:
        raise ServiceValidationError(
            f"cpu_steer takes at most {abi.LB_MAX_STEER_CPUS} CPUs, got {len(cpus)}"
        )
    bad = [c for c in cpus if not 0 <= c < limit]
    if bad:
        raise ServiceValidationError(f"cpu_steer: no CPU {bad} here (CPUs 0..{limit - 1})")
    if len(set(cpus)) != len(cpus):
        raise ServiceValidationError("cpu_steer lists a CPU twice")
