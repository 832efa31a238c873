"""Which proxy mode runs: the one fallback policy, shared by the appliance's proxy services
(Dataplane.proxy) and a ProxyEngine that loads its own programs.

"auto" splices in the kernel when it accepts the sockhash programs and otherwise relays in user
space, with a warning that says why; "sockhash" refuses to fall back (ProxyUnavailableError);
"userspace" never loads BPF.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Literal, TypeVar

from xdpfw.errors import ConflictError
from xdpfw.proxy.loader import SockProxyError

log = logging.getLogger(__name__)

RequestedMode = Literal["auto", "sockhash", "userspace"]

T = TypeVar("T")


class ProxyUnavailableError(ConflictError):
    """Proxy mode sockhash was demanded, and the kernel refused the sockhash programs."""


def load_or_fall_back(mode: RequestedMode, load: Callable[[], T],
                      who: str) -> tuple[T | None, str | None]:
    """(what `load` returned, None) when the proxy splices in the kernel; (None, why not)
    when it relays in user space (why is None when "userspace" was asked for). `who` names
    the caller in the messages."""
    if mode == "userspace":
        return None, None
    try:
        return load(), None
    except SockProxyError as e:
        if mode == "sockhash":
            raise ProxyUnavailableError(
                f"{who}: proxy mode sockhash demanded, but the kernel refused the sockhash "
                f"proxy: {e}") from e
        log.warning("%s: kernel refused the sockhash proxy (%s); falling back to the "
                    "user-space relay", who, str(e).splitlines()[0])
        return None, str(e)
