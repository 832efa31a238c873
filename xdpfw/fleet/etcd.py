"""A small etcd v3 client over etcd's own JSON gateway (`/v3/...`), on httpx.

Only what the fleet needs: range, txn, lease grant/keep-alive, and watch. Every call tries
the configured endpoints in turn (the one that answered last first), so a stopped member
costs one refused connection, not an error. Why not a client library: README, "Fleet".

The gateway speaks proto3 JSON: bytes are base64, int64s are strings, and fields equal to
their default (0, false, PUT) are left out.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx

from xdpfw.errors import FleetStoreError, FleetUnavailableError, XdpfwError

log = logging.getLogger(__name__)

# Sent as gRPC metadata by the gateway: a member cut off from the cluster's leader refuses
# (and cancels watches) instead of serving stale data (etcd's WithRequireLeader).
REQUIRE_LEADER = {"Grpc-Metadata-hasleader": "true"}


class EtcdUnavailable(FleetUnavailableError):
    """No endpoint answered (or none had a leader): the caller keeps its state and retries."""


class EtcdError(FleetStoreError):
    """etcd refused a request (too large, bad lease, ...)."""


class Compacted(XdpfwError):
    """A watch asked for revisions etcd has compacted away: resync from a snapshot."""

    def __init__(self, compact_revision: int) -> None:
        super().__init__(f"etcd compacted its history up to revision {compact_revision}")
        self.compact_revision = compact_revision


def b64(data: bytes | str) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


def unb64(text: str | None) -> bytes:
    return base64.b64decode(text) if text else b""


def prefix_end(prefix: bytes) -> bytes:
    """The range_end that covers every key starting with prefix."""
    end = bytearray(prefix)
    while end and end[-1] == 0xFF:
        end.pop()
    if not end:
        return b"\0"
    end[-1] += 1
    return bytes(end)


@dataclass(frozen=True)
class KeyValue:
    key: bytes
    value: bytes
    mod_revision: int
    create_revision: int
    lease: int = 0

    @classmethod
    def of(cls, kv: dict) -> KeyValue:
        return cls(unb64(kv.get("key")), unb64(kv.get("value")), int(kv.get("mod_revision", 0)),
                   int(kv.get("create_revision", 0)), int(kv.get("lease", 0)))


@dataclass(frozen=True)
class Event:
    deleted: bool
    kv: KeyValue


@dataclass(frozen=True)
class Tls:
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None


class Etcd:
    def __init__(self, endpoints: list[str], *, timeout_s: float = 3.0, tls: Tls | None = None,
                 username: str | None = None, password: str | None = None) -> None:
        self.endpoints = [e.rstrip("/") for e in endpoints]
        self.timeout_s = timeout_s
        self.tls = tls or Tls()
        self._credentials = (username, password) if username else None
        self._token: str | None = None
        self._preferred = 0
        self._lock = threading.Lock()
        self._http = self._client()

    def _client(self, read_timeout: float | None = -1.0) -> httpx.Client:
        t = self.tls
        verify: Any = t.ca_file or True
        cert = (t.cert_file, t.key_file) if t.cert_file else None
        read = self.timeout_s if read_timeout == -1.0 else read_timeout
        return httpx.Client(verify=verify, cert=cert, headers=REQUIRE_LEADER,
                            timeout=httpx.Timeout(self.timeout_s, connect=1.0, read=read))

    def close(self) -> None:
        self._http.close()

    # -- plumbing -------------------------------------------------------------------------

    def _order(self) -> list[int]:
        n = len(self.endpoints)
        return [(self._preferred + i) % n for i in range(n)]

    def call(self, path: str, body: dict) -> dict:
        """POST /v3/<path> to the first endpoint that answers; EtcdUnavailable if none does."""
        errors = []
        for i in self._order():
            url = f"{self.endpoints[i]}/v3/{path}"
            try:
                r = self._http.post(url, json=body, headers=self._auth_header(i))
            except httpx.TransportError as e:
                errors.append(f"{self.endpoints[i]}: {e or type(e).__name__}")
                continue
            data = _json(r)
            if r.status_code == 200:
                self._preferred = i
                return data
            message = str(data.get("message") or data.get("error") or r.text).strip()
            if _unavailable(r.status_code, message):
                errors.append(f"{self.endpoints[i]}: {message}")
                continue
            if "invalid auth token" in message and self._credentials:
                self._token = None  # expired: authenticate again, on the next call
            raise EtcdError(f"etcd refused {path}: {message}")
        raise EtcdUnavailable("no etcd endpoint answered: " + "; ".join(errors))

    def _auth_header(self, i: int) -> dict[str, str]:
        if self._credentials is None:
            return {}
        with self._lock:
            if self._token is None:
                user, password = self._credentials
                r = self._http.post(f"{self.endpoints[i]}/v3/auth/authenticate",
                                    json={"name": user, "password": password or ""})
                if r.status_code != 200:
                    raise EtcdError(f"etcd refused the fleet's credentials: {_json(r)}")
                self._token = _json(r)["token"]
            return {"Authorization": self._token}

    # -- keys -----------------------------------------------------------------------------

    def get_prefix(self, prefix: bytes, page: int = 10_000) -> tuple[int, list[KeyValue]]:
        """Every key under prefix at one revision (pages of `page` keys). Returns (that
        revision, the keys in key order)."""
        end, start, revision, out = prefix_end(prefix), prefix, 0, []
        while True:
            body = {"key": b64(start), "range_end": b64(end), "limit": page}
            if revision:
                body["revision"] = revision
            r = self.call("kv/range", body)
            revision = revision or int(r["header"]["revision"])
            kvs = [KeyValue.of(kv) for kv in r.get("kvs", [])]
            out += kvs
            if not r.get("more") or not kvs:
                return revision, out
            start = kvs[-1].key + b"\0"

    def header(self, key: bytes) -> tuple[str, int]:
        """(cluster id, current revision), from a count-only read of key."""
        h = self.call("kv/range", {"key": b64(key), "count_only": True})["header"]
        return str(h["cluster_id"]), int(h["revision"])

    def get(self, key: bytes) -> tuple[int, KeyValue | None]:
        r = self.call("kv/range", {"key": b64(key)})
        kvs = r.get("kvs", [])
        return int(r["header"]["revision"]), (KeyValue.of(kvs[0]) if kvs else None)

    def get_at(self, key: bytes, revision: int) -> KeyValue | None:
        """A key as it was at `revision`; Compacted if etcd no longer knows."""
        try:
            r = self.call("kv/range", {"key": b64(key), "revision": revision})
        except EtcdError as e:
            if "compacted" in str(e):
                raise Compacted(revision) from None
            raise
        kvs = r.get("kvs", [])
        return KeyValue.of(kvs[0]) if kvs else None

    def txn(self, compare: list[dict], success: list[dict],
            failure: list[dict] | None = None) -> tuple[bool, int, list[dict]]:
        """(succeeded, the revision after it, the responses of the branch taken)."""
        r = self.call("kv/txn", {"compare": compare, "success": success,
                                 "failure": failure or []})
        return bool(r.get("succeeded")), int(r["header"]["revision"]), r.get("responses", [])

    def put(self, key: bytes, value: bytes, lease: int = 0) -> int:
        body: dict = {"key": b64(key), "value": b64(value)}
        if lease:
            body["lease"] = str(lease)
        return int(self.call("kv/put", body)["header"]["revision"])

    # -- leases ---------------------------------------------------------------------------

    def grant(self, ttl_s: int) -> int:
        return int(self.call("lease/grant", {"TTL": ttl_s})["ID"])

    def keepalive(self, lease: int) -> bool:
        """Renew a lease; False when it has expired (grant another)."""
        r = self.call("lease/keepalive", {"ID": str(lease)})
        return int(r.get("result", {}).get("TTL", 0)) > 0

    def revoke(self, lease: int) -> None:
        self.call("lease/revoke", {"ID": str(lease)})

    # -- watch ----------------------------------------------------------------------------

    def watch(self, prefix: bytes, start_revision: int) -> Watch:
        return Watch(self, prefix, start_revision)


class Watch:
    """One watch stream over a key prefix from a revision, on one endpoint at a time.
    Iterate it for (header revision, events) as etcd sends them; close() from another
    thread ends the iteration."""

    def __init__(self, etcd: Etcd, prefix: bytes, start_revision: int) -> None:
        self.etcd, self.prefix, self.start = etcd, prefix, start_revision
        self._http = etcd._client(read_timeout=None)  # a quiet watch is not a dead one
        self._closed = False

    def close(self) -> None:
        self._closed = True
        self._http.close()

    def __iter__(self) -> Iterator[tuple[int, list[Event]]]:
        etcd, errors = self.etcd, []
        body = {"create_request": {"key": b64(self.prefix),
                                   "range_end": b64(prefix_end(self.prefix)),
                                   "start_revision": self.start}}
        for i in etcd._order():
            started = False
            try:
                with self._http.stream("POST", f"{etcd.endpoints[i]}/v3/watch", json=body,
                                       headers=etcd._auth_header(i)) as r:
                    if r.status_code != 200:
                        r.read()
                        errors.append(f"{etcd.endpoints[i]}: HTTP {r.status_code}")
                        continue
                    etcd._preferred = i
                    started = True
                    yield from self._results(r)
                    return
            except (httpx.TransportError, httpx.StreamError) as e:
                if self._closed:
                    return
                if started:  # the stream broke: the caller resumes from what it applied
                    raise EtcdUnavailable(f"the watch on {etcd.endpoints[i]} ended: {e}") from e
                errors.append(f"{etcd.endpoints[i]}: {e or type(e).__name__}")
        raise EtcdUnavailable("no etcd endpoint accepted the watch: " + "; ".join(errors))

    def _results(self, r: httpx.Response) -> Iterator[tuple[int, list[Event]]]:
        for line in r.iter_lines():
            if not line:
                continue
            msg = _json_text(line)
            if "error" in msg:
                raise EtcdUnavailable(f"the watch failed: {msg['error'].get('message')}")
            res = msg.get("result", {})
            if int(res.get("compact_revision", 0)):
                raise Compacted(int(res["compact_revision"]))
            if res.get("canceled"):
                raise EtcdUnavailable(f"etcd cancelled the watch: {res.get('cancel_reason')}")
            events = [Event(ev.get("type") == "DELETE", KeyValue.of(ev["kv"]))
                      for ev in res.get("events", [])]
            yield int(res.get("header", {}).get("revision", 0)), events
        if not self._closed:
            raise EtcdUnavailable("etcd closed the watch stream")


def _json(r: httpx.Response) -> dict:
    try:
        data = r.json()
    except ValueError:
        return {"message": r.text[:200]}
    return data if isinstance(data, dict) else {"message": str(data)[:200]}


def _json_text(line: str) -> dict:
    try:
        data = json.loads(line)
    except ValueError:
        return {"error": {"message": f"not JSON: {line[:100]!r}"}}
    return data if isinstance(data, dict) else {"error": {"message": "not an object"}}


def _unavailable(status: int, message: str) -> bool:
    """Errors another member may not have: no leader, timed out, stopping, too many requests."""
    m = message.lower()
    return status in (502, 503, 504) or any(s in m for s in (
        "no leader", "timed out", "timeout", "stopped", "leader changed", "not capable",
        "too many requests", "unavailable", "raft"))
