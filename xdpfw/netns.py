"""Network namespaces and veth links, through pyroute2 (and setns for one thread).

Used by the demo topology, the tests, the load balancer and the proxy engine. Everything here
stays in the root *mount* namespace: only the network namespace is entered (pyroute2's NetNS,
or setns(CLONE_NEWNET) for the calling thread), so pins under /sys/fs/bpf remain visible,
unlike with `ip netns exec`.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from pyroute2 import IPRoute, NetNS, netns
from pyroute2.netlink.exceptions import NetlinkError

from xdpfw.errors import NotFoundError

ENOENT = 2
CLONE_NEWNET = 0x40000000

_libc = ctypes.CDLL(None, use_errno=True)


@contextlib.contextmanager
def rtnl(ns: str | None) -> Iterator[IPRoute]:
    """An rtnetlink socket in namespace `ns` (None: the namespace this process is in).

    Never creates the namespace: pyroute2's NetNS does by default (O_CREAT), which would turn
    a mistyped netns in a request into a new, empty namespace on the box."""
    if ns is None:
        sock = IPRoute()
    else:
        try:
            sock = NetNS(ns, flags=0)
        except FileNotFoundError:
            raise NotFoundError(f"no network namespace {ns!r}") from None
    try:
        yield sock
    finally:
        sock.close()


@contextlib.contextmanager
def thread_in_netns(name: str | None) -> Iterator[None]:
    """Run the block with this thread in network namespace `name` (None: stay). Sockets
    made and threads started inside belong to that namespace, and the kernel resolves a
    devmap ifindex written inside there."""
    if name is None:
        yield
        return
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/var/run/netns/{name}", os.O_RDONLY)
    try:
        if _libc.setns(target, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into netns {name}: {os.strerror(err)}")
        try:
            yield
        finally:
            _libc.setns(own, CLONE_NEWNET)
    finally:
        os.close(own)
        os.close(target)


def ifindex(ns: str | None, ifname: str) -> int:
    with rtnl(ns) as ip:
        found = ip.link_lookup(ifname=ifname)
    if not found:
        raise LookupError(f"no interface {ifname!r} in netns {ns or '<host>'}")
    return found[0]


def create_netns(name: str) -> None:
    netns.create(name)
    with rtnl(name) as ip:
        ip.link("set", index=ip.link_lookup(ifname="lo")[0], state="up")


def remove_netns(name: str) -> None:
    """Remove a namespace; only "already gone" is tolerated."""
    try:
        netns.remove(name)
    except (FileNotFoundError, NetlinkError) as e:
        if getattr(e, "errno", None) != ENOENT and getattr(e, "code", None) != ENOENT:
            raise


def list_netns() -> list[str]:
    return list(netns.listnetns())


@dataclass(frozen=True)
class Addr:
    address: str
    prefixlen: int


def veth_pair(
    ns_a: str,
    if_a: str,
    ns_b: str,
    if_b: str,
    addrs_a: Sequence[Addr] = (),
    addrs_b: Sequence[Addr] = (),
) -> None:
    """Create a veth pair with one end in each namespace, addressed and up.

    The pair is created inside ns_a so that the host's interface names never collide.
    """
    with rtnl(ns_a) as ip:
        ip.link("add", ifname=if_a, kind="veth", peer={"ifname": if_b, "net_ns_fd": ns_b})
    for ns, ifname, addrs in ((ns_a, if_a, addrs_a), (ns_b, if_b, addrs_b)):
        with rtnl(ns) as ip:
            idx = ip.link_lookup(ifname=ifname)[0]
            for a in addrs:
                # nodad: IPv6 addresses are usable at once instead of after ~2 s of DAD.
                extra = {"flags": 0x02} if ":" in a.address else {}
                ip.addr("add", index=idx, address=a.address, prefixlen=a.prefixlen, **extra)
            ip.link("set", index=idx, state="up")


def link_mac(ns: str | None, ifname: str) -> str:
    with rtnl(ns) as ip:
        return ip.get_links(ifindex(ns, ifname))[0].get_attr("IFLA_ADDRESS")


def run_in(
    ns: str, argv: Sequence[str], timeout: float = 30.0, input: str | None = None
) -> subprocess.CompletedProcess:
    """Run a command in a namespace (through `ip netns exec`: fine for tools that need no pins)."""
    return subprocess.run(
        ["ip", "netns", "exec", ns, *argv], capture_output=True, text=True, timeout=timeout,
        input=input,
    )


def wait_until(predicate, timeout: float = 5.0, interval: float = 0.05) -> bool:
    """Poll instead of sleeping a fixed time."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
