"""Forward mode `proxy`: a ProxyEngine per service, listening on VIP:port in [lb].netns.

The service never enters the XDP maps (its packets pass to the stack). Its engine picks a
backend from the service's Maglev table (ServiceState.proxy_table) and splices the two sockets
in the kernel, with the sockproxy programs every proxy service shares (Dataplane.proxy), or
relays in user space when those are refused (xdpfw/proxy/fallback.py: the one policy). Its
backends need no MAC: they may sit behind a router. Engines live in this process: they stop
with the daemon, and start again from the store.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

from xdpfw.dataplane.dataplane import Dataplane
from xdpfw.errors import XdpfwError
from xdpfw.lb.model import ServiceState
from xdpfw.proxy.engine import Mode, PickBackend, ProxyEngine, ServiceCounters
from xdpfw.proxy.fallback import RequestedMode
from xdpfw.proxy.limits import Budgets, ProxyLimits
from xdpfw.proxy.loader import SockProxyDataplane

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProxyStatus:
    mode: Mode | None  # None: no engine runs
    reason: str | None  # why it relays in user space, or why no engine runs
    counters: ServiceCounters | None


def picker(svc: ServiceState) -> PickBackend:
    """pick_backend for svc's engine: the client's 5-tuple hashed into the Maglev table.

    Runs on the engine's thread without the lock: it reads svc.proxy_table, which
    MaglevPublisher.recompute replaces whole. blake2b, not the kernel's jhash: proxied flows
    never take the XDP path, so only stability matters.
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


class ProxyServices:
    def __init__(self, dp: Dataplane, netns: str | None, mode: RequestedMode,
                 limits: ProxyLimits) -> None:
        self.dp = dp
        self.netns = netns
        self.mode = mode
        self.budgets = Budgets(limits)  # one for all engines
        self.engines: dict[int, ProxyEngine] = {}  # by service id
        self.errors: dict[int, str] = {}  # why a restored service's engine does not run
        self.fallback: str | None = None  # why proxy services relay in user space

    def prepare(self) -> None:
        """Load the shared programs now (a compile, once), so a new service does not compile
        inside its store transaction; a demanded sockhash the kernel refuses raises here."""
        self._dataplane()

    def start(self, svc: ServiceState, strict: bool) -> None:
        """Listen on svc's VIP:port. strict (a new service): failures raise; else (restore)
        they are logged and kept for status(), and the rest goes on."""
        sid = svc.rec.id
        try:
            sockproxy = self._dataplane()
            engine = ProxyEngine(svc.rec.vip, svc.rec.port, picker(svc), sid,
                                 mode="userspace" if sockproxy is None else "sockhash",
                                 dataplane=sockproxy, netns=self.netns,
                                 budgets=self.budgets)
            engine.start()
        except XdpfwError as e:
            if strict:
                raise
            self.errors[sid] = str(e)
            log.error("service %d: %s", sid, e)
            return
        self.engines[sid] = engine
        self.errors.pop(sid, None)

    def stop(self, service_id: int) -> None:
        engine = self.engines.pop(service_id, None)
        if engine is not None:
            engine.stop()
        self.errors.pop(service_id, None)

    def status(self, svc: ServiceState) -> ProxyStatus:
        engine = self.engines.get(svc.rec.id)
        if engine is None:
            return ProxyStatus(None, self.errors.get(svc.rec.id), None)
        reason = engine.fallback_reason or (self.fallback if engine.mode == "userspace"
                                            else None)
        return ProxyStatus(engine.mode, reason, engine.counters())

    def close(self) -> None:
        """Stop every engine; the shared programs are the Dataplane's, closed with it."""
        for sid in list(self.engines):
            self.stop(sid)

    def _dataplane(self) -> SockProxyDataplane | None:
        sockproxy, self.fallback = self.dp.proxy(self.mode)
        return sockproxy
