"""Who counts as one client when connections are capped per client: the proxy services'
[lb] proxy_max_connections_per_client and the TCP API's [api] max_connections_per_client.
An address is cheap to vary inside an IPv6 /64 (one host is commonly given a whole one), so
a /64 is one client; an IPv4 address is one, also when a dual-stack socket writes it
IPv4-mapped."""

from __future__ import annotations

import ipaddress
import threading
import time

# A per-client cap left unset is this fraction of the total it divides, so that it takes
# four client addresses, not one, to fill a budget.
PER_CLIENT_DIVISOR = 4
REFUSAL_LOG_S = 10.0  # at most one log line this often for clients over their cap


def per_client_cap(configured: int | None, total: int) -> int:
    """A configured per-client cap (0: none), or by default a quarter of `total`."""
    return max(total // PER_CLIENT_DIVISOR, 1) if configured is None else configured


def client_key(host: str) -> str:
    """The address a per-client cap counts: an IPv4 address (also when written IPv4-mapped),
    or an IPv6 /64, which one host can hold whole (SLAAC, privacy addresses)."""
    ip = ipaddress.ip_address(host.partition("%")[0])
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class ClientCounts:
    """Connections held by each client key (client_key) against a cap (0: none); safe to
    share between threads (the proxy engines')."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self._held: dict[str, int] = {}
        self._lock = threading.Lock()

    def take(self, key: str) -> bool:
        with self._lock:
            held = self._held.get(key, 0)
            if self.cap and held >= self.cap:
                return False
            self._held[key] = held + 1
            return True

    def give(self, key: str) -> None:
        with self._lock:
            held = self._held.get(key, 0) - 1
            if held > 0:
                self._held[key] = held
            else:  # the table holds only addresses with connections
                self._held.pop(key, None)

    def held(self, key: str) -> int:
        with self._lock:
            return self._held.get(key, 0)


class RefusalLog:
    """Refusals of clients over their cap, for a log that says them at most every
    REFUSAL_LOG_S, each line with how many there were since the last: a flood of refused
    connections cannot flood the log. Not shared between threads."""

    def __init__(self) -> None:
        self._logged_at = -REFUSAL_LOG_S
        self._unlogged = 0

    def refused(self) -> int:
        """Count one refusal; how many to log now (0: not yet)."""
        self._unlogged += 1
        now = time.monotonic()
        if now - self._logged_at < REFUSAL_LOG_S:
            return 0
        n, self._unlogged, self._logged_at = self._unlogged, 0, now
        return n
