"""Next-hop resolution through the kernel neighbour table, between two test namespaces.

Every address used lives on (or is routed inside) the namespaces created here.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from xdpfw import netns as nsutil
from xdpfw.lb.neigh import NeighbourUnresolved, lookup_route, resolve, resolve_async

LB_IF, BE_IF = "lb0", "be0"
LB_V4, BE_V4, ABSENT_V4 = "10.77.41.1", "10.77.41.2", "10.77.41.99"
LB_V6, BE_V6 = "fd77:41::1", "fd77:41::2"
ROUTED_NET, ROUTED_BACKEND = "10.77.42.0", "10.77.42.7"


@dataclass(frozen=True)
class Link:
    lb: str  # the appliance's namespace
    backend: str  # the backend's namespace


@pytest.fixture
def link(make_netns: Callable[[str], str]) -> Link:
    lb, backend = make_netns("lb"), make_netns("be")
    for ns in (lb, backend):
        # No IPv6 DAD: neighbour solicitations wait for a non-tentative link-local address,
        # which would add ~2 s to every test; the appliance's links are long up.
        proc = nsutil.run_in(ns, ["sysctl", "-qw", "net.ipv6.conf.default.accept_dad=0"])
        assert proc.returncode == 0, f"sysctl in {ns}: {proc.stderr}"
    nsutil.veth_pair(
        lb,
        LB_IF,
        backend,
        BE_IF,
        addrs_a=[nsutil.Addr(LB_V4, 24), nsutil.Addr(LB_V6, 64)],
        addrs_b=[nsutil.Addr(BE_V4, 24), nsutil.Addr(BE_V6, 64)],
    )
    # A probe sent before both ends have carrier is lost and retried only after 1 s.
    ready = nsutil.wait_until(
        lambda: operstate(lb, LB_IF) == "UP" and operstate(backend, BE_IF) == "UP"
    )
    assert ready, f"veth not up: {operstate(lb, LB_IF)}, {operstate(backend, BE_IF)}"
    return Link(lb, backend)


def operstate(ns: str, ifname: str) -> str:
    with nsutil.rtnl(ns) as ip:
        return ip.get_links(nsutil.ifindex(ns, ifname))[0].get_attr("IFLA_OPERSTATE")


def neigh_table(ns: str) -> str:
    proc = nsutil.run_in(ns, ["ip", "neigh", "show"])
    return proc.stdout + proc.stderr


@pytest.mark.parametrize("address", [BE_V4, BE_V6])
def test_resolves_peer_mac(link: Link, address: str) -> None:
    want = nsutil.link_mac(link.backend, BE_IF)
    start = time.monotonic()
    got = resolve(address, link.lb, timeout_s=3.0)
    elapsed = time.monotonic() - start
    assert got.lladdr == want, (
        f"{address}: resolved {got.lladdr}, {BE_IF} has {want}; table:\n{neigh_table(link.lb)}"
    )
    assert (got.ifname, got.ifindex) == (LB_IF, nsutil.ifindex(link.lb, LB_IF)), got
    assert got.next_hop == address and got.state == "REACHABLE", got
    assert elapsed < 2.0, f"resolving a live peer took {elapsed:.2f}s"
    # Now in the table: answered without waiting.
    start = time.monotonic()
    again = resolve(address, link.lb, timeout_s=0.1)
    assert again.lladdr == want, again
    assert time.monotonic() - start < 0.5


def test_routed_backend_resolves_to_gateway_mac(link: Link) -> None:
    with nsutil.rtnl(link.lb) as ip:
        ip.route("add", dst=ROUTED_NET, dst_len=24, gateway=BE_V4)
    route = lookup_route(ROUTED_BACKEND, link.lb)
    assert (route.ifname, route.next_hop, route.source) == (LB_IF, BE_V4, LB_V4), route
    got = resolve(ROUTED_BACKEND, link.lb, timeout_s=3.0)
    want = nsutil.link_mac(link.backend, BE_IF)
    assert (got.next_hop, got.lladdr) == (BE_V4, want), (
        f"via {BE_V4}: got {got}, want MAC {want}; table:\n{neigh_table(link.lb)}"
    )


def test_absent_host_raises_within_timeout(link: Link) -> None:
    timeout = 1.0
    start = time.monotonic()
    with pytest.raises(NeighbourUnresolved) as caught:
        resolve(ABSENT_V4, link.lb, timeout_s=timeout)
    elapsed = time.monotonic() - start
    err = caught.value
    assert (err.address, err.ifname) == (ABSENT_V4, LB_IF), err
    assert "no reply" in err.reason, err.reason
    assert elapsed < timeout + 0.5, f"gave up after {elapsed:.2f}s, timeout {timeout}s"


@pytest.mark.parametrize(
    ("address", "reason"),
    [("10.78.0.1", "no route"), (LB_V4, "address of this host")],
)
def test_unroutable_or_local_address_raises(link: Link, address: str, reason: str) -> None:
    with pytest.raises(NeighbourUnresolved, match=reason) as caught:
        resolve(address, link.lb, timeout_s=0.5)
    assert caught.value.ifname is None, caught.value


def test_resolve_async(link: Link) -> None:
    got = asyncio.run(resolve_async(BE_V4, link.lb, timeout_s=3.0))
    assert got.lladdr == nsutil.link_mac(link.backend, BE_IF), got


def test_kernel_failure_is_reported_before_the_timeout(link: Link) -> None:
    # Faster ARP retries on this link only: the kernel gives up (FAILED) after 3 x 100 ms.
    proc = nsutil.run_in(link.lb, ["sysctl", "-qw", f"net.ipv4.neigh.{LB_IF}.retrans_time_ms=100"])
    assert proc.returncode == 0, proc.stderr
    start = time.monotonic()
    with pytest.raises(NeighbourUnresolved, match="FAILED"):
        resolve(ABSENT_V4, link.lb, timeout_s=5.0)
    elapsed = time.monotonic() - start
    assert elapsed < 2.0, f"FAILED should end the wait early, took {elapsed:.2f}s"


def test_stale_entry_is_returned_and_reconfirmed(link: Link) -> None:
    # The unicast probes to the wrong MAC go unanswered; make the kernel give up on them
    # (3 x 100 ms) and broadcast instead, rather than after 5 s delay + 3 x 1 s.
    for setting in ("delay_first_probe_time=0", "retrans_time_ms=100"):
        proc = nsutil.run_in(link.lb, ["sysctl", "-qw", f"net.ipv4.neigh.{LB_IF}.{setting}"])
        assert proc.returncode == 0, proc.stderr
    old_mac = "02:00:00:00:00:01"
    with nsutil.rtnl(link.lb) as ip:
        idx = ip.link_lookup(ifname=LB_IF)[0]
        ip.neigh("replace", dst=BE_V4, lladdr=old_mac, ifindex=idx, state="stale")
    first = resolve(BE_V4, link.lb, timeout_s=0.5)
    assert (first.lladdr, first.state) == (old_mac, "STALE"), first
    want = nsutil.link_mac(link.backend, BE_IF)
    # XDP traffic never confirms an entry: resolve() asked the kernel to, so it heals.
    healed = nsutil.wait_until(lambda: resolve(BE_V4, link.lb).lladdr == want, timeout=3.0)
    assert healed, f"entry not re-confirmed to {want}; table:\n{neigh_table(link.lb)}"
