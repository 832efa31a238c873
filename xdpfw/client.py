"""The CLI's client of the REST API, over the daemon's unix socket (no token needed there).

Every non-2xx answer becomes an ApiError whose message is one line a person can act on;
a daemon that is not running becomes ApiUnavailable.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import httpx

from xdpfw.errors import XdpfwError

DEFAULT_SOCKET = "/run/xdpfw/api.sock"


def default_socket() -> str:
    return os.environ.get("XDPFW_SOCKET", DEFAULT_SOCKET)


class ApiUnavailable(XdpfwError):
    """Nothing answers on the socket."""


class ApiError(XdpfwError):
    """The API refused a request. `status` is the HTTP status; `detail` the full reason
    (a verifier log can follow the first line)."""

    def __init__(self, status: int, detail: str) -> None:
        self.status = status
        self.detail = detail
        super().__init__(detail.splitlines()[0] if detail else f"HTTP {status}")


def _detail(r: httpx.Response) -> str:
    """The API's errors are {"detail": str, "errors": [...]?} (xdpfw.api.errors); detail
    says it all in its first line."""
    try:
        body = r.json()
    except ValueError:
        return r.text.strip() or r.reason_phrase
    detail = body.get("detail", body) if isinstance(body, dict) else body
    return detail if isinstance(detail, str) else json.dumps(detail)


class Client:
    def __init__(self, socket_path: str | None = None, timeout: float = 60.0) -> None:
        self.socket = socket_path or default_socket()
        self.http = httpx.Client(
            transport=httpx.HTTPTransport(uds=self.socket),
            base_url="http://xdpfw",
            timeout=timeout,
        )

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def request(self, method: str, path: str, **kw) -> Any:
        try:
            r = self.http.request(method, path, **kw)
        except httpx.TransportError as e:
            raise ApiUnavailable(
                f"cannot reach the xdpfw API on {self.socket} ({e}): is `xdpfw serve` running?"
            ) from None
        if r.status_code >= 400:
            raise ApiError(r.status_code, _detail(r))
        if r.headers.get("content-type", "").startswith("application/json"):
            return r.json()
        return r.text

    def get(self, path: str, **kw) -> Any:
        return self.request("GET", path, **kw)

    def post(self, path: str, **kw) -> Any:
        return self.request("POST", path, **kw)

    def put(self, path: str, **kw) -> Any:
        return self.request("PUT", path, **kw)

    def patch(self, path: str, **kw) -> Any:
        return self.request("PATCH", path, **kw)

    def delete(self, path: str, **kw) -> Any:
        return self.request("DELETE", path, **kw)

    def stream(self, path: str, params: dict | None = None) -> Iterator[bytes]:
        """The body of a GET as it arrives (a capture: no read timeout)."""
        try:
            with self.http.stream(
                "GET", path, params=params, timeout=httpx.Timeout(10.0, read=None)
            ) as r:
                if r.status_code >= 400:
                    r.read()
                    raise ApiError(r.status_code, _detail(r))
                yield from r.iter_raw()
        except httpx.TransportError as e:
            raise ApiUnavailable(
                f"cannot reach the xdpfw API on {self.socket} ({e}): is `xdpfw serve` running?"
            ) from None

    def events(self, params: dict | None = None) -> Iterator[dict]:
        """Server-sent events from /api/v1/events, one dict per `data:` line."""
        try:
            with self.http.stream(
                "GET", "/api/v1/events", params=params, timeout=httpx.Timeout(10.0, read=None)
            ) as r:
                if r.status_code >= 400:
                    r.read()
                    raise ApiError(r.status_code, _detail(r))
                for line in r.iter_lines():
                    if line.startswith("data:"):
                        yield json.loads(line[5:])
        except httpx.TransportError as e:
            raise ApiUnavailable(
                f"cannot reach the xdpfw API on {self.socket} ({e}): is `xdpfw serve` running?"
            ) from None
