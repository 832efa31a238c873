"""Next-hop MAC of a backend, from the kernel's route and neighbour tables (pyroute2).

XDP_TX/XDP_REDIRECT frames bypass the kernel's neighbour subsystem, so the control plane must
tell the data plane which MAC to write. The route lookup says which interface and next hop (the
backend itself when on-link, else the gateway) the kernel would use; the neighbour table gives
that next hop's MAC.

When the entry is missing or unusable, resolution is started with RTM_NEWNEIGH carrying
NTF_USE: the kernel then sends the ARP request / neighbour solicitation itself, as if a packet
were queued (`ip neigh replace ADDR dev IF use`), without any datagram to the backend and
without entering the namespace.
"""

from __future__ import annotations

import asyncio
import errno
import time
from dataclasses import dataclass

from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl import ndmsg

from xdpfw.errors import BackendUnresolvedError
from xdpfw.netns import rtnl

RTN_UNICAST = 1
RTN_LOCAL = 2
IFF_NOARP = 0x80

# States whose lladdr was confirmed at some point: usable as is. STALE/DELAY/PROBE entries
# are also re-confirmed in the background (see resolve).
USABLE = ndmsg.NUD_REACHABLE | ndmsg.NUD_PERMANENT | ndmsg.NUD_NOARP
NEEDS_CONFIRMATION = ndmsg.NUD_STALE | ndmsg.NUD_DELAY | ndmsg.NUD_PROBE

_ROUTE_TYPES = {3: "broadcast", 4: "anycast", 5: "multicast", 6: "blackhole", 7: "unreachable"}
_ROUTE_TYPES |= {8: "prohibit", 9: "throw", 10: "nat"}


class NeighbourUnresolved(BackendUnresolvedError):
    """No usable link-layer address for `address` on `ifname` (None: no egress interface) in
    namespace `ns` (None: the current one)."""

    def __init__(self, address: str, ifname: str | None, reason: str,
                 ns: str | None = None) -> None:
        where = (f" on {ifname}" if ifname else "") + (f" in netns {ns}" if ns else "")
        super().__init__(f"cannot resolve {address}{where}: {reason}")
        self.address = address
        self.ifname = ifname
        self.ns = ns
        self.reason = reason


@dataclass(frozen=True)
class Route:
    """Where the kernel sends packets for an address."""

    ifindex: int
    ifname: str
    # The address whose MAC frames carry: the gateway, or the address itself when on-link.
    next_hop: str
    source: str | None


@dataclass(frozen=True)
class Neighbour:
    address: str
    next_hop: str
    lladdr: str
    ifindex: int
    ifname: str
    # Neighbour state name as `ip neigh` prints it, e.g. "REACHABLE".
    state: str


def state_name(state: int) -> str:
    names = [n[4:] for n, v in ndmsg.NUD_NAMES.items() if v and state & v]
    return "|".join(sorted(names)) or "NONE"


def _route(ip, address: str, ns: str | None) -> Route:
    try:
        found = ip.route("get", dst=address)
    except NetlinkError as e:
        if e.code in (errno.ENETUNREACH, errno.EHOSTUNREACH):
            raise NeighbourUnresolved(address, None, "no route to it", ns) from e
        raise NeighbourUnresolved(address, None, f"route lookup failed: {e}", ns) from e
    msg = found[0]
    if msg["type"] == RTN_LOCAL:
        raise NeighbourUnresolved(address, None, "it is an address of this host", ns)
    if msg["type"] != RTN_UNICAST:
        kind = _ROUTE_TYPES.get(msg["type"], f"type {msg['type']}")
        raise NeighbourUnresolved(address, None, f"its route is {kind}", ns)
    oif = msg.get_attr("RTA_OIF")
    if oif is None:
        raise NeighbourUnresolved(address, None, "its route has no output interface", ns)
    link = ip.get_links(oif)[0]
    ifname = link.get_attr("IFLA_IFNAME")
    if link["flags"] & IFF_NOARP:
        raise NeighbourUnresolved(address, ifname, "the interface has no link-layer neighbours",
                                  ns)
    gateway = msg.get_attr("RTA_GATEWAY")
    return Route(oif, ifname, gateway or address, msg.get_attr("RTA_PREFSRC"))


def lookup_route(address: str, ns: str | None = None) -> Route:
    """The egress interface and next hop for `address` in namespace `ns` (None: current)."""
    with rtnl(ns) as ip:
        return _route(ip, address, ns)


def _entry(ip, address: str, ifindex: int) -> tuple[int, str | None]:
    """(NUD state, lladdr) of the neighbour entry, (NUD_NONE, None) when there is none."""
    try:
        msg = ip.neigh("get", dst=address, ifindex=ifindex)[0]
    except NetlinkError as e:
        if e.code == errno.ENOENT:
            return ndmsg.NUD_NONE, None
        raise
    return msg["state"], msg.get_attr("NDA_LLADDR")


def _kick(ip, address: str, route: Route, target: str, ns: str | None) -> None:
    """Make the kernel (re)start resolution of `address`, as a queued packet would."""
    try:
        ip.neigh(
            "replace",
            dst=address,
            ifindex=route.ifindex,
            flags=ndmsg.NTF_USE,
            state=ndmsg.NUD_NONE,
        )
    except NetlinkError as e:
        raise NeighbourUnresolved(target, route.ifname, f"cannot start resolution: {e}",
                                  ns) from e


def resolve(
    address: str,
    ns: str | None = None,
    *,
    timeout_s: float = 3.0,
    poll_s: float = 0.01,
) -> Neighbour:
    """The MAC that frames to `address` must carry, in namespace `ns` (None: current).

    Usable entries are returned at once; a STALE/DELAY/PROBE entry is returned too and the
    kernel is asked to re-confirm it, since XDP traffic never does. Otherwise resolution is
    started and the table polled until `timeout_s`. Raises NeighbourUnresolved.
    """
    with rtnl(ns) as ip:
        route = _route(ip, address, ns)
        hop = route.next_hop
        target = address if hop == address else f"{address} (via {hop})"

        def found(state: int, lladdr: str) -> Neighbour:
            return Neighbour(address, hop, lladdr, route.ifindex, route.ifname, state_name(state))

        state, lladdr = _entry(ip, hop, route.ifindex)
        if lladdr and state & (USABLE | NEEDS_CONFIRMATION):
            if state & NEEDS_CONFIRMATION:
                _kick(ip, hop, route, target, ns)
            return found(state, lladdr)

        _kick(ip, hop, route, target, ns)
        deadline = time.monotonic() + timeout_s
        while True:
            state, lladdr = _entry(ip, hop, route.ifindex)
            if lladdr and state & (USABLE | NEEDS_CONFIRMATION):
                return found(state, lladdr)
            # FAILED after the kick is the kernel's verdict: all its probes went unanswered.
            if state & ndmsg.NUD_FAILED:
                raise NeighbourUnresolved(target, route.ifname, "no reply to ARP/ND (FAILED)",
                                          ns)
            if time.monotonic() >= deadline:
                raise NeighbourUnresolved(
                    target,
                    route.ifname,
                    f"no reply to ARP/ND within {timeout_s}s (state {state_name(state)})",
                    ns,
                )
            time.sleep(poll_s)


async def resolve_async(
    address: str, ns: str | None = None, *, timeout_s: float = 3.0
) -> Neighbour:
    """resolve() in a worker thread, for the asyncio control plane."""
    return await asyncio.to_thread(resolve, address, ns, timeout_s=timeout_s)
