"""Pure ASGI middleware: request body limits, and a JSON 500 for whatever nothing else caught.

Both wrap the whole app, so they also cover what FastAPI's own handlers never see (a body
read by a route that parses it itself, an exception in another middleware).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger(__name__)

MIB = 1 << 20


@dataclass(frozen=True)
class BodyLimits:
    """default: every endpoint. sets: endpoints that take a whole set in one request (a
    2M-prefix blocklist is ~33 MB of text), listed in `set_paths` by path, or by "METHOD
    path" (an entry ending in "/" stands for the paths one level below it)."""

    default: int = 1 * MIB
    sets: int = 64 * MIB
    set_paths: frozenset[str] = frozenset()

    def for_path(self, path: str, method: str = "POST") -> int:
        parent = path.rsplit("/", 1)[0] + "/"  # /api/v1/sets/NAME: "/api/v1/sets/"
        names = (path, parent, f"{method} {path}", f"{method} {parent}")
        return self.sets if any(n in self.set_paths for n in names) else self.default


class BodyTooLarge(HTTPException):
    """Raised from receive(): FastAPI's handler turns it into the JSON 413 like any other
    HTTPException, and `Connection: close` stops uvicorn reading (and discarding) the rest."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, too_large(limit), headers={"Connection": "close"})


def too_large(limit: int) -> str:
    return f"the request body exceeds {limit} bytes, this endpoint's limit"


class BodyLimit:
    """A Content-Length over the limit is answered 413 before the app runs, unread. A body
    without one (chunked) is counted as the app reads it, and the read that passes the limit
    raises BodyTooLarge: what was accepted is at most the limit plus one chunk."""

    def __init__(self, app: ASGIApp, limits: BodyLimits) -> None:
        self.app = app
        self.limits = limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limits.for_path(scope["path"], scope.get("method", "GET"))
        length = _content_length(scope)
        if length is not None and length > limit:
            await send_json(send, 413, too_large(limit), close=True)
            return
        seen = 0
        started = False

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(limit)
            return message

        async def watched(message: Message) -> None:
            nonlocal started
            started |= message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, watched)
        except BodyTooLarge as e:  # read outside FastAPI's handlers (another middleware)
            if started:
                raise
            await send_json(send, 413, str(e.detail), close=True)


class JsonErrors:
    """The last resort: an exception no handler took becomes a JSON 500 with a short detail
    (the traceback goes to the log, not to the client)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watched(message: Message) -> None:
            nonlocal started
            started |= message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watched)
        except ClientDisconnect:  # gone mid-body (or cut off by a timeout): no one to answer
            log.debug("%s %s: the client went away", scope.get("method"), scope.get("path"))
        except Exception as e:
            if started:  # too late for a status: uvicorn logs it and closes the connection
                raise
            log.exception("%s %s failed", scope.get("method"), scope.get("path"))
            await send_json(send, 500, internal_error(e))


def internal_error(e: BaseException) -> str:
    return f"internal error ({type(e).__name__}); the daemon's log has the details"


async def send_json(send: Send, status: int, detail: str, close: bool = False) -> None:
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"),
               (b"content-length", str(len(body)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # the server's parser refuses it before we get here
    return None
