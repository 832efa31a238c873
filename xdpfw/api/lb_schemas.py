"""Request and response models of /api/v1/services. Validation itself lives in xdpfw.lb."""

from __future__ import annotations

import ipaddress
from dataclasses import asdict
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from xdpfw.lb.health import HealthCheckConfig
from xdpfw.lb.model import BackendSpec, BackendState, ServiceSpec, ServiceState
from xdpfw.lb.proxies import ProxyStatus
from xdpfw.lb.service import LoadBalancer
from xdpfw.lb.store import HealthSpec
from xdpfw.proxy.engine import ServiceCounters

BackendStateName = Literal["active", "draining"]


def _ip(v: str) -> str:
    try:
        return str(ipaddress.ip_address(v))
    except ValueError:
        raise ValueError(f"{v!r} is not an IP address") from None


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Traffic(BaseModel):
    packets: int
    bytes: int


class HealthCheck(_Strict):
    kind: Literal["tcp", "http"] = "tcp"
    interval_s: float = Field(2.0, gt=0, le=3600)
    timeout_s: float = Field(1.0, gt=0, le=600)
    rise: int = Field(2, ge=1, le=100)
    fall: int = Field(3, ge=1, le=100)
    http_path: str = "/"
    port: int | None = Field(None, ge=1, le=65535, description="default: the service port")

    def spec(self) -> HealthSpec:
        """HealthConfigError (422) for what the fields above do not check (http_path)."""
        cfg = HealthCheckConfig(self.kind, self.interval_s, self.timeout_s, self.rise,
                                self.fall, self.http_path)
        return HealthSpec(cfg, self.port)

    @classmethod
    def of(cls, h: HealthSpec | None) -> HealthCheck | None:
        if h is None:
            return None
        c = h.config
        return cls(kind=c.kind, interval_s=c.interval_s, timeout_s=c.timeout_s, rise=c.rise,
                   fall=c.fall, http_path=c.http_path, port=h.port)


class BackendCreate(_Strict):
    address: str = Field(description="the backend's own address; its MAC is resolved via ARP/ND "
                         "(not for forward proxy: any routed address)")
    weight: int = Field(1, ge=0, le=1000)
    state: BackendStateName = "active"

    _addr = field_validator("address")(classmethod(lambda cls, v: _ip(v)))

    def spec(self) -> BackendSpec:
        return BackendSpec(self.address, self.weight, self.state)


class BackendUpdate(_Strict):
    weight: int | None = Field(None, ge=0, le=1000)
    state: BackendStateName | None = None


class BackendPublic(BaseModel):
    id: int
    service_id: int
    address: str
    weight: int
    state: BackendStateName
    resolved: bool = Field(description="its MAC is known (forward proxy needs none: always "
                           "true); unresolved backends get no traffic")
    mac: str | None
    interface: str | None
    error: str | None = Field(description="why it is unresolved")
    healthy: bool
    health_error: str | None
    in_table: bool
    share: float = Field(description="fraction of the Maglev table it owns")
    traffic: Traffic

    @classmethod
    def of(cls, lb: LoadBalancer, svc: ServiceState, be: BackendState) -> BackendPublic:
        p, b = lb.backend_counters(be)
        share = lb.share(svc, be)
        n = be.neighbour
        return cls(
            id=be.rec.id, service_id=svc.rec.id, address=be.rec.address, weight=be.rec.weight,
            state=be.rec.state, resolved=n is not None or svc.proxied, mac=n.lladdr if n else None,
            interface=n.ifname if n else None, error=be.error, healthy=be.healthy,
            health_error=be.health_error, in_table=share > 0, share=round(share, 4),
            traffic=Traffic(packets=p, bytes=b),
        )


class ServiceCreate(_Strict):
    name: str = Field("", max_length=64)
    vip: str = Field(description="virtual IP (IPv4 or IPv6) the backends hold on loopback")
    port: int = Field(ge=1, le=65535)
    proto: Literal["tcp", "udp"] = "tcp"
    forward: Literal["tx", "redirect", "proxy"] = Field(
        "tx", description="tx: same L2, bounce out of the receiving NIC; redirect: via the "
        "backend's own NIC; proxy: terminate TCP on the appliance (the VIP must be one of its "
        "addresses) and splice each connection to a backend socket in the kernel"
    )
    cpu_steer: list[int] = Field(
        default_factory=list, max_length=8,
        description="hand the service's packets to the stack on these CPUs instead",
    )
    health_check: HealthCheck | None = None
    backends: list[BackendCreate] = Field(default_factory=list)

    _vip = field_validator("vip")(classmethod(lambda cls, v: _ip(v)))

    def spec(self) -> ServiceSpec:
        return ServiceSpec(
            vip=self.vip, port=self.port, proto=self.proto, forward=self.forward,
            name=self.name, cpu_steer=tuple(self.cpu_steer),
            health=self.health_check.spec() if self.health_check else None,
            backends=tuple(b.spec() for b in self.backends),
        )


class ProxyConnections(BaseModel):
    accepted: int
    active: int
    closed: int
    backend_failures: int = Field(description="backend refused, unreachable, timed out or none "
                                  "usable: the client got a clean close")
    relayed_in_userspace: int = Field(description="connections the kernel would not splice")
    queue_resets: int = Field(description="spliced connections reset because the kernel held "
                              "more than [lb] proxy_max_queued_mib of their bytes for a peer "
                              "that did not read them")
    limit_waits: int = Field(description="times this service stopped accepting because the "
                             "daemon's proxied connections reached [lb] proxy_max_connections")
    idle_resets: int = Field(description="connections reset after [lb] proxy_idle_timeout_s "
                             "without a byte either way")
    client_refusals: int = Field(description="connections reset as they were accepted because "
                                 "their client address (an IPv6 /64) already held [lb] "
                                 "proxy_max_connections_per_client proxied connections")


class ProxyStats(BaseModel):
    """Forward proxy counters: in sockhash mode read from the BPF maps (sp_conns, sp_traffic)."""

    connections: ProxyConnections
    bytes_to_backend: int
    bytes_to_client: int
    kernel_bytes_to_backend: int = Field(description=(
        "moved by the sockhash verdict program; the kernel now and then runs it twice on one "
        "skb (up to 64 KiB, the bytes sent once), which this then counts twice (docs/perf.md)"))
    kernel_bytes_to_client: int

    @classmethod
    def of(cls, c: ServiceCounters) -> ProxyStats:
        return cls(
            connections=ProxyConnections(**asdict(c.connections)),
            bytes_to_backend=c.bytes_to_backend, bytes_to_client=c.bytes_to_client,
            kernel_bytes_to_backend=c.kernel.bytes_to_backend,
            kernel_bytes_to_client=c.kernel.bytes_to_client,
        )


class ServicePublic(BaseModel):
    id: int
    name: str
    vip: str
    port: int
    proto: str
    forward: str
    cpu_steer: list[int]
    health_check: HealthCheck | None
    backends: list[BackendPublic]
    forwarded: Traffic
    no_backend: Traffic = Field(description="dropped: no usable backend")
    mode_in_use: Literal["sockhash", "userspace"] | None = Field(
        None, description="forward proxy: how connections are forwarded (None: not running)")
    fallback_reason: str | None = Field(
        None, description="forward proxy: why it relays in user space, or why it is not running")
    proxy: ProxyStats | None = None

    @classmethod
    def of(cls, lb: LoadBalancer, svc: ServiceState) -> ServicePublic:
        c = lb.counters(svc)
        r = svc.rec
        px = lb.proxy_status(svc) if svc.proxied else ProxyStatus(None, None, None)
        return cls(
            mode_in_use=px.mode, fallback_reason=px.reason,
            proxy=ProxyStats.of(px.counters) if px.counters else None,
            id=r.id, name=r.name, vip=r.vip, port=r.port, proto=r.proto, forward=r.forward,
            cpu_steer=list(r.cpu_steer), health_check=HealthCheck.of(r.health),
            backends=[BackendPublic.of(lb, svc, b) for b in svc.backends.values()],
            forwarded=Traffic(packets=c["forwarded"][0], bytes=c["forwarded"][1]),
            no_backend=Traffic(packets=c["no_backend"][0], bytes=c["no_backend"][1]),
        )


class CpuSteer(_Strict):
    cpus: list[int] = Field(
        default_factory=list, max_length=8,
        description="spread passing traffic of no service over these CPUs; [] turns it off",
    )
