"""Who is on the other end of a request: the unix-socket peer's credentials (SO_PEERCRED),
put in the ASGI scope's "state" by the server's protocol (xdpfw/httpserver.py).

A request without them did not come over the daemon's unix socket (TCP, a test client): it
is treated as remote.
"""

from __future__ import annotations

from dataclasses import dataclass

from starlette.types import Scope

STATE_KEY = "xdpfw.peer"


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    gid: int


def peer_of(scope: Scope) -> Peer | None:
    peer = scope.get("state", {}).get(STATE_KEY)
    return peer if isinstance(peer, Peer) else None
