"""Writes the load balancer's maps (services, Maglev rows, backends, ports, CPUs); reads counters.

Byte order of the LB maps is converted here and only here: addresses and ports go in network
order, slots and generations in host order (see xdpfw_abi.h).
"""

from __future__ import annotations

import ctypes
import ipaddress
import socket
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from xdpfw.dataplane import abi
from xdpfw.dataplane.maps import MapHandle, open_map

_U32 = struct.Struct("<I")
PROTO_NUMBERS = {"tcp": socket.IPPROTO_TCP, "udp": socket.IPPROTO_UDP}
CPU_QUEUE_SIZE = 2048  # cpu_map: frames queued per CPU before drops


@dataclass(frozen=True)
class Vip:
    address: str  # IPv4 or IPv6, any spelling
    port: int
    proto: str  # tcp | udp

    def key(self) -> bytes:
        ip = ipaddress.ip_address(self.address)
        k = abi.LbVip(
            port=socket.htons(self.port), proto=PROTO_NUMBERS[self.proto], family=ip.version
        )
        ctypes.memmove(k.addr, ip.packed, len(ip.packed))
        return bytes(k)


def mac_bytes(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", ""))


def _steer(cpus: Sequence[int]) -> abi.LbSteer:
    if len(cpus) > abi.LB_MAX_STEER_CPUS:
        raise ValueError(f"at most {abi.LB_MAX_STEER_CPUS} steering CPUs, got {len(cpus)}")
    s = abi.LbSteer(count=len(cpus))
    for i, cpu in enumerate(cpus):
        s.cpus[i] = cpu
    return s


class LbMaps:
    """The LB's maps, opened from their pins (shared by every build and instance)."""

    def __init__(self, config) -> None:
        self._handles: list[MapHandle] = []

        def handle(name: str) -> MapHandle:
            h = open_map(config.pin_dir, name)
            self._handles.append(h)
            return h

        self.table_size = config.lb_table_size
        self.config = handle("lb_config")
        self.services = handle("lb_services")
        self.vip_index = handle("lb_vip_index")
        self.service_slots = handle("lb_service_slots")
        self.tables = handle("lb_tables")
        self.backends = handle("lb_backends")
        self.conntrack = handle("lb_conntrack")
        self.flow_cache = handle("lb_flow_cache")
        self.tx_ports = handle("tx_ports")
        self.cpu_map = handle("cpu_map")
        self.service_counters = handle("lb_service_counters")
        self.backend_counters = handle("lb_backend_counters")
        self.ncpus = self.backend_counters.value_size // ctypes.sizeof(abi.Counter)

    def close(self) -> None:
        for h in self._handles:
            h.close()

    # -- services -------------------------------------------------------------------------

    def set_config(self, services: int, steer_cpus: Sequence[int] = ()) -> None:
        cfg = abi.LbConfig(services=services, steer=_steer(steer_cpus))
        self.config.update(_U32.pack(0), bytes(cfg))

    def get_config(self) -> abi.LbConfig:
        raw = self.config.lookup(_U32.pack(0))
        return abi.LbConfig.from_buffer_copy(raw) if raw else abi.LbConfig()

    def set_service(self, vip: Vip, slot: int, fwd: int, steer_cpus: Sequence[int] = ()) -> None:
        """The service in lb_services (the truth), then in its slot, then its VIP's bucket
        of lb_vip_index points there: the program's fast lookup never meets a slot not
        written yet."""
        key = vip.key()
        value = abi.LbService(slot=slot, fwd=fwd, steer=_steer(steer_cpus))
        self.services.update(key, bytes(value))
        entry = abi.LbServiceSlot(vip=abi.LbVip.from_buffer_copy(key), svc=value)
        self.service_slots.update(_U32.pack(slot), bytes(entry))
        self._index(abi.lb_vip_bucket(key))

    def del_service(self, vip: Vip) -> bool:
        return self.del_service_key(vip.key())

    def del_service_key(self, key: bytes) -> bool:
        gone = self.services.delete(key)
        self._index(abi.lb_vip_bucket(key))
        return gone

    def _index(self, bucket: int) -> None:
        """A bucket of lb_vip_index from lb_services: none, the one service's slot + 1, or
        "several: look in lb_services"."""
        members = [v.slot for k, v in self.service_entries().items()
                   if abi.lb_vip_bucket(k) == bucket]
        value = (0 if not members else members[0] + 1 if len(members) == 1
                 else abi.LB_VIP_COLLIDE)
        self.vip_index.update(_U32.pack(bucket), _U32.pack(value))

    def sync_vip_index(self) -> None:
        """Every bucket from lb_services (start-up: the pins may be older)."""
        buckets = {abi.lb_vip_bucket(k) for k in self.service_entries()}
        for bucket in range(abi.LB_VIP_INDEX):
            if bucket in buckets or self.vip_index.lookup(_U32.pack(bucket)) != bytes(4):
                self._index(bucket)

    def service_entries(self) -> dict[bytes, abi.LbService]:
        out = {}
        for raw in self.services.all_keys():
            val = self.services.lookup(raw)
            if val is not None:
                out[raw] = abi.LbService.from_buffer_copy(val)
        return out

    # -- Maglev rows ----------------------------------------------------------------------

    def write_row(self, service_slot: int, entries: Mapping[int, int] | Sequence[int]) -> None:
        """Write table entries of a service: a full row (sequence) or {position: backend slot}.
        abi.LB_NO_BACKEND marks positions no backend owns."""
        items: Iterable[tuple[int, int]] = (
            entries.items() if isinstance(entries, Mapping) else enumerate(entries)
        )
        base = service_slot * self.table_size
        keys, vals = [], []
        for pos, backend in items:
            keys.append(_U32.pack(base + pos))
            vals.append(_U32.pack(backend))
        self.tables.update_many(b"".join(keys), b"".join(vals), len(keys))

    def read_row(self, service_slot: int) -> list[int]:
        base = service_slot * self.table_size
        return [
            _U32.unpack(self.tables.lookup(_U32.pack(base + i)) or b"\xff\xff\xff\xff")[0]
            for i in range(self.table_size)
        ]

    # -- backends -------------------------------------------------------------------------

    def set_backend(
        self, slot: int, dmac: str, smac: str, tx_port: int, gen: int, live: bool = True
    ) -> None:
        be = abi.LbBackend(tx_port=tx_port, gen=gen, flags=abi.LB_BE_LIVE if live else 0)
        ctypes.memmove(be.dmac, mac_bytes(dmac), 6)
        ctypes.memmove(be.smac, mac_bytes(smac), 6)
        self.backends.update(_U32.pack(slot), bytes(be))

    def clear_backend(self, slot: int) -> None:
        """Not live: conntrack entries pointing here are re-balanced."""
        self.backends.update(_U32.pack(slot), bytes(abi.LbBackend()))

    def get_backend(self, slot: int) -> abi.LbBackend:
        return abi.LbBackend.from_buffer_copy(self.backends.lookup(_U32.pack(slot)))

    # -- egress ports and CPUs ------------------------------------------------------------

    def set_tx_port(self, port: int, ifindex: int) -> None:
        """Needs the calling thread in the interface's network namespace (the kernel resolves
        the ifindex there)."""
        self.tx_ports.update(_U32.pack(port), _U32.pack(ifindex))

    def del_tx_port(self, port: int) -> None:
        self.tx_ports.delete(_U32.pack(port))

    def set_cpu(self, cpu: int, qsize: int = CPU_QUEUE_SIZE) -> None:
        self.cpu_map.update(_U32.pack(cpu), _U32.pack(qsize))

    # -- conntrack ------------------------------------------------------------------------

    def flow_backend(self, flow: abi.LbFlow) -> tuple[int, int] | None:
        """(backend slot, generation) that conntrack holds for a flow, None if none."""
        raw = self.conntrack.lookup(bytes(flow))
        if raw is None:
            return None
        ct = abi.LbCt.from_buffer_copy(raw)
        return ct.backend, ct.gen

    def clear_conntrack(self) -> int:
        """Forget every flow: the per-CPU caches, then the LRU."""
        n = abi.LB_FLOW_CACHE
        keys = b"".join(_U32.pack(i) for i in range(n))
        self.flow_cache.update_many(keys, bytes(self.flow_cache.value_size * n), n)
        keys = self.conntrack.all_keys()
        for k in keys:
            self.conntrack.delete(k)
        return len(keys)

    # -- counters -------------------------------------------------------------------------

    def _sum(self, handle: MapHandle, index: int) -> tuple[int, int]:
        raw = handle.lookup(_U32.pack(index))
        if raw is None:
            return (0, 0)
        vals = struct.unpack(f"<{2 * self.ncpus}Q", raw[: 16 * self.ncpus])
        return (sum(vals[0::2]), sum(vals[1::2]))

    def service_totals(self, slot: int) -> dict[str, tuple[int, int]]:
        base = slot * abi.LB_SVC_COUNTERS
        return {
            "forwarded": self._sum(self.service_counters, base + abi.LB_SVC_FORWARDED),
            "no_backend": self._sum(self.service_counters, base + abi.LB_SVC_NO_BACKEND),
        }

    def backend_totals(self, slot: int) -> tuple[int, int]:
        return self._sum(self.backend_counters, slot)

    def reset_service_counters(self, slot: int) -> None:
        zero = bytes(self.service_counters.value_size)
        for i in range(abi.LB_SVC_COUNTERS):
            self.service_counters.update(_U32.pack(slot * abi.LB_SVC_COUNTERS + i), zero)

    def reset_backend_counters(self, slot: int) -> None:
        self.backend_counters.update(_U32.pack(slot), bytes(self.backend_counters.value_size))
