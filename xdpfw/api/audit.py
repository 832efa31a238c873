"""Who changed what through the API: every request that changes something (POST, PUT,
PATCH, DELETE) and succeeds is recorded in the audit trail (xdpfw/audit.py) with its client,
just before its answer goes out. A route says what it did with `audit(request, detail)`,
or that it changed nothing (a dry run) with `audit(request, None)`.

The client: on the unix socket, the peer's uid and pid (SO_PEERCRED); over TCP, the name of
the token it showed, and its address.
"""

from __future__ import annotations

from fastapi.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from xdpfw.api.peer import peer_of
from xdpfw.audit import AuditLog

DETAIL_KEY = "xdpfw.audit"  # in the request scope's state: what the route did
TOKEN_KEY = "xdpfw.token"  # the name of the token a TCP client showed
CHANGES = frozenset({"POST", "PUT", "PATCH", "DELETE"})
NOTHING = object()  # audit(request, None): no change to record


def audit(request: Request, detail: str | None) -> None:
    request.scope.setdefault("state", {})[DETAIL_KEY] = NOTHING if detail is None else detail


def client_of(scope: Scope) -> str:
    peer = peer_of(scope)
    if peer is not None:
        return f"uid {peer.uid} (pid {peer.pid}, unix socket)"
    where = scope.get("client")
    addr = f"{where[0]}:{where[1]}" if where else "?"
    token = scope.get("state", {}).get(TOKEN_KEY)
    return f"token {token} ({addr})" if token else f"no token ({addr})"


class AuditTrail:
    """Pure ASGI, so it sees the status of every answer, whoever produced it."""

    def __init__(self, app: ASGIApp, log: AuditLog) -> None:
        self.app = app
        self.log = log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in CHANGES:
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})

        async def recorded(message: Message) -> None:
            if message["type"] == "http.response.start" and message["status"] < 400:
                detail = state.get(DETAIL_KEY, "")
                if detail is not NOTHING:
                    query = scope.get("query_string", b"").decode(errors="replace")
                    action = f"{scope['method']} {scope['path']}" + (f"?{query}" if query else "")
                    await run_in_threadpool(self.log.record, client_of(scope), action, detail)
            await send(message)

        await self.app(scope, receive, recorded)
