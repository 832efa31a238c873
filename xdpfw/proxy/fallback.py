"""Which proxy mode runs: the one fallback policy, shared by the appliance's proxy services
(Dataplane.proxy) and a ProxyEngine that loads its own programs.

"auto" splices in the kernel when it accepts the sockhash programs and a connection spliced
through them passes the self-test (SockProxyDataplane.self_test: bulk and request/response
bytes intact both ways), and otherwise relays in user space, with a warning that says why;
"sockhash" refuses to fall back (ProxyUnavailableError); "userspace" never loads BPF.

Why the splice is preferred whenever it works (docs/perf.md, Socket proxy): at 1 KiB
request/response over 100 connections it does 2.6x the relay's transactions per second at
2.3x fewer CPU-seconds per transaction, and no payload byte enters this process. On one bulk
stream it costs about the relay's CPU per byte (0.9-1.2x), because the kernel handles each
skb separately (an ACK, a verdict, a psock queue and a worker send per skb): not enough to
relay a service in user space, where the daemon's own thread would pay it. The relay's one
advantage, backpressure towards a fast sender, is why "userspace" stays selectable.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Literal, TypeVar

from xdpfw.errors import ConflictError
from xdpfw.proxy.loader import SockProxyDataplane, SockProxyError

log = logging.getLogger(__name__)

RequestedMode = Literal["auto", "sockhash", "userspace"]

T = TypeVar("T", bound=SockProxyDataplane)


class ProxyUnavailableError(ConflictError):
    """Proxy mode sockhash was demanded, and the kernel refused the sockhash programs."""


def load_or_fall_back(mode: RequestedMode, load: Callable[[], T],
                      who: str) -> tuple[T | None, str | None]:
    """(what `load` returned, None) when the proxy splices in the kernel; (None, why not)
    when it relays in user space (why is None when "userspace" was asked for). `who` names
    the caller in the messages. What `load` returns must pass its self_test() too."""
    if mode == "userspace":
        return None, None
    try:
        dataplane = load()
        try:
            dataplane.self_test()
        except BaseException:
            dataplane.close()
            raise
        return dataplane, None
    except SockProxyError as e:
        if mode == "sockhash":
            raise ProxyUnavailableError(
                f"{who}: proxy mode sockhash demanded, but the kernel refused the sockhash "
                f"proxy: {e}") from e
        log.warning("%s: kernel refused the sockhash proxy (%s); falling back to the "
                    "user-space relay", who, str(e).splitlines()[0])
        return None, str(e)
