"""What the API does when a client or the disk misbehaves: bodies over the limit (413), a full
or locked store (507/503, nothing changed), and anything unexpected (a JSON 500, never text)."""

from __future__ import annotations

import asyncio
import logging
import sqlite3

import pytest
from fastapi.testclient import TestClient

from tests.test_api import snapshot
from xdpfw.api.app import SET_PATHS, create_app
from xdpfw.api.middleware import BodyLimit, BodyLimits, JsonErrors

pytestmark = pytest.mark.bpf


@pytest.fixture
def client(fw):
    with TestClient(create_app(fw)) as c:
        yield c


def json_detail(r) -> str:
    assert r.headers["content-type"] == "application/json", (r.status_code, r.text)
    return r.json()["detail"]


# -- storage --------------------------------------------------------------------------------


@pytest.fixture
def full_store(fw):
    """The store may not grow by a single page (SQLite answers SQLITE_FULL, as on a full
    disk). VACUUM first, so no free page is left to reuse."""
    db = fw.store._db
    limit = db.execute("PRAGMA max_page_count").fetchone()[0]
    db.execute("VACUUM")
    pages = db.execute("PRAGMA page_count").fetchone()[0]
    db.execute(f"PRAGMA max_page_count = {pages}")
    yield
    db.execute(f"PRAGMA max_page_count = {limit}")


def prefixes(n: int, second: int = 0) -> list[str]:
    return [f"10.{second}.{i >> 8}.{i & 255}" for i in range(n)]


def test_a_full_store_is_a_507_and_changes_nothing(client, fw, full_store):
    before = snapshot(fw)
    comment = "x" * 200
    # JSON bulk under BATCH_MIN: a row per rule, far more than the pages' free space.
    r = client.post("/api/v1/rules/bulk", json={"prefixes": prefixes(999), "comment": comment})
    assert r.status_code == 507, r.text
    assert "SQLITE_FULL" in json_detail(r) and "nothing was changed" in r.text, r.text
    assert snapshot(fw) == before, "a refused bulk add changed the store or the maps"
    # The streamed blocklist path: chunks already in the kernel must come out again.
    text = "\n".join(prefixes(5000, 1))
    r = client.post("/api/v1/rules/bulk", content=text, headers={"content-type": "text/plain"})
    assert r.status_code == 507, r.text
    assert snapshot(fw) == before, "a refused blocklist changed the store or the maps"

    # Single adds until the last free bytes of the last page are used up.
    for i in range(2000):
        state = snapshot(fw)
        r = client.post("/api/v1/rules", json={"prefix": f"10.9.{i >> 8}.{i & 255}",
                                               "comment": comment})
        if r.status_code != 201:
            break
    assert r.status_code == 507 and "full" in json_detail(r), r.text
    assert snapshot(fw) == state, "a refused single add changed the store or the maps"


def test_the_store_works_again_once_there_is_room(client, fw):
    db = fw.store._db
    limit = db.execute("PRAGMA max_page_count").fetchone()[0]
    db.execute("VACUUM")
    db.execute(f"PRAGMA max_page_count = {db.execute('PRAGMA page_count').fetchone()[0]}")
    try:
        r = client.post("/api/v1/rules/bulk", json={"prefixes": prefixes(999)})
        assert r.status_code == 507, r.text
    finally:
        db.execute(f"PRAGMA max_page_count = {limit}")
    # No transaction was left open by the failed one (a ROLLBACK after SQLite had ended it
    # itself used to raise "no transaction is active" instead of the real cause).
    assert not db.in_transaction
    r = client.post("/api/v1/rules/bulk", json={"prefixes": prefixes(999)})
    assert r.status_code == 201, r.text
    assert len(fw.store.load_rules()) == 999


@pytest.fixture
def locked_store(fw):
    """Another process holds the store's write lock; ours waits 0.2 s, not 10."""
    other = sqlite3.connect(fw.store.path, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    fw.store._db.execute("PRAGMA busy_timeout = 200")
    yield
    fw.store._db.execute("PRAGMA busy_timeout = 10000")
    other.execute("ROLLBACK")
    other.close()


def test_a_locked_store_is_a_503_and_changes_nothing(client, fw, locked_store):
    before = snapshot(fw)
    r = client.post("/api/v1/rules", json={"prefix": "192.0.2.0/24"})
    assert r.status_code == 503, r.text
    assert "database is locked" in json_detail(r), r.text
    r = client.post("/api/v1/rules/bulk", content="198.51.100.0/24\n",
                    headers={"content-type": "text/plain"})
    assert r.status_code == 503, r.text
    assert snapshot(fw) == before


def test_an_unexpected_error_is_a_json_500_with_the_traceback_in_the_log(
    client, fw, monkeypatch, caplog
):
    def broken():
        raise RuntimeError("/secret/path in the message")

    monkeypatch.setattr(fw, "stats", broken)
    with caplog.at_level(logging.ERROR):
        r = client.get("/api/v1/stats")
    assert r.status_code == 500
    detail = json_detail(r)
    assert "RuntimeError" in detail and "secret" not in detail, detail
    assert any(rec.exc_info and "secret" in str(rec.exc_info[1]) for rec in caplog.records)

    def denied():
        raise PermissionError(13, "Permission denied", "/secret/file")

    monkeypatch.setattr(fw, "stats", denied)
    r = client.get("/api/v1/stats")
    assert r.status_code == 500 and "secret" not in json_detail(r), r.text


def test_a_storage_oserror_names_the_cause():
    """ENOSPC from a file call is a full disk (507); from a bpf() call (no file name) it is
    not a storage error at all."""
    import errno

    from xdpfw.api.app import status_of
    from xdpfw.db import storage_error

    full = storage_error(OSError(errno.ENOSPC, "No space left on device", "/var/lib/x"))
    assert full is not None and status_of(full) == 507 and "No space left" in str(full)
    assert status_of(storage_error(OSError(errno.EIO, "Input/output error", "/var/lib/x"))) == 503
    assert storage_error(OSError(errno.ENOSPC, "map update")) is None


# -- body limits ----------------------------------------------------------------------------


def test_a_content_length_over_the_limit_is_a_413_before_the_body_is_read(client, fw):
    before = snapshot(fw)
    r = client.post("/api/v1/rules", content=b"{" + b" " * (1 << 20) + b"}",
                    headers={"content-type": "application/json"})
    assert r.status_code == 413, r.text
    assert "1048576 bytes" in json_detail(r)
    assert r.headers["connection"] == "close"
    assert snapshot(fw) == before


def test_set_endpoints_take_more_than_the_others(fw):
    limits = BodyLimits(default=1000, sets=20_000)
    with TestClient(create_app(fw, body_limits=limits)) as c:
        text = "\n".join(prefixes(500))  # ~6 kB: over the default, under the sets' limit
        assert len(text) > 1000
        r = c.post("/api/v1/rules/bulk", content=text, headers={"content-type": "text/plain"})
        assert r.status_code == 201, r.text

        def chunked():  # no Content-Length: counted as it is read
            for _ in range(10):
                yield b"# " + b"x" * 4000 + b"\n"

        before = snapshot(fw)
        r = c.post("/api/v1/rules/bulk", content=chunked(),
                   headers={"content-type": "text/plain"})
        assert r.status_code == 413 and "20000 bytes" in json_detail(r), r.text
        assert snapshot(fw) == before
        r = c.post("/api/v1/rules", json={"prefix": "192.0.2.0/24", "comment": "y" * 990})
        assert r.status_code == 413, r.text


def test_every_set_path_is_a_route(client):
    """Each entry ("path" for POST, or "METHOD path"; a path ending in "/" stands for the
    paths one level below it) names a route that takes a body with that method."""
    paths = client.get("/openapi.json").json()["paths"]
    for entry in SET_PATHS:
        method, _, path = entry.rpartition(" ")
        routes = [p for p in paths if p == path or (
            path.endswith("/") and p.startswith(path) and "/" not in p[len(path):])]
        assert any((method or "POST").lower() in paths[p] for p in routes), entry


def test_a_streamed_body_is_read_no_further_than_the_limit():
    """100 MB offered in 64 KiB chunks against a 1 MiB limit: the app sees at most the limit
    plus one chunk, and the client gets a JSON 413 (raised outside FastAPI's handlers)."""
    chunk, offered = 1 << 16, 0

    async def receive():
        nonlocal offered
        offered += chunk
        return {"type": "http.request", "body": b"x" * chunk, "more_body": offered < 100 << 20}

    async def app(scope, receive, send):
        while (await receive())["more_body"]:
            pass

    sent = []

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "path": "/api/v1/rules", "headers": []}
    asyncio.run(JsonErrors(BodyLimit(app, BodyLimits(default=1 << 20)))(scope, receive, send))
    assert offered <= (1 << 20) + chunk, f"read {offered} bytes past a 1 MiB limit"
    assert sent[0]["status"] == 413 and (b"connection", b"close") in sent[0]["headers"]
    assert b"1048576 bytes" in sent[1]["body"]


def test_a_client_gone_mid_body_is_not_an_error(caplog):
    """A client that hangs up (or is cut off by the idle timeout) while its body is read: no
    answer to send, and no traceback in the log."""
    from starlette.requests import Request

    async def receive():
        return {"type": "http.disconnect"}

    async def app(scope, receive, send):
        await Request(scope, receive).body()

    sent = []

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/api/v1/rules/bulk", "headers": []}
    with caplog.at_level(logging.INFO):
        asyncio.run(JsonErrors(BodyLimit(app, BodyLimits()))(scope, receive, send))
    assert sent == [] and not caplog.records, caplog.text


class FailingCommit:
    """The store's connection, except that COMMIT fails as it does when the disk fills up
    between the writes and the commit. The error is a real one, from a scratch database
    that hit its page limit."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db
        scratch = sqlite3.connect(":memory:")
        scratch.execute("CREATE TABLE t (x BLOB)")
        scratch.execute("PRAGMA max_page_count = 2")
        try:
            scratch.execute("INSERT INTO t VALUES (?)", (b"x" * 100_000,))
        except sqlite3.OperationalError as e:
            self.error = e
        assert self.error.sqlite_errorname == "SQLITE_FULL"

    def execute(self, sql: str, *args):
        if sql == "COMMIT":
            raise self.error
        return self._db.execute(sql, *args)

    def __getattr__(self, name: str):
        return getattr(self._db, name)


def test_a_failed_commit_undoes_rule_changes(client, fw):
    rule = client.post("/api/v1/rules", json={"prefix": "192.0.2.0/24"}).json()
    before = snapshot(fw)
    real = fw.store._db
    fw.store._db = FailingCommit(real)
    try:
        r = client.post("/api/v1/rules", json={"prefix": "198.51.100.0/24"})
        assert r.status_code == 507, r.text
        r = client.delete(f"/api/v1/rules/{rule['id']}")
        assert r.status_code == 507, r.text
        assert snapshot(fw) == before and fw.table.row_of_id(rule["id"]) is not None
    finally:
        fw.store._db = real
    assert not real.in_transaction


def test_a_failed_commit_leaves_interfaces_as_they_were(client, fw, make_netns):
    from xdpfw import netns as nsutil
    from xdpfw.dataplane.abi import POLICY_PASS
    from xdpfw.dataplane.attach import link_info

    a, b = make_netns("sta"), make_netns("stb")
    nsutil.veth_pair(a, "st0", b, "st1")
    body = {"name": "st0", "netns": a, "mode": "generic"}
    real = fw.store._db
    fw.store._db = FailingCommit(real)
    try:
        r = client.post("/api/v1/interfaces", json=body)
        assert r.status_code == 507, r.text
        assert link_info("st0", a)[2] is None, "attached although the store refused it"
        assert ("st0", a) not in fw.attachments and not fw.store.load_interfaces()
    finally:
        fw.store._db = real
    assert client.post("/api/v1/interfaces", json=body).status_code == 201
    prog = link_info("st0", a)[2]
    fw.store._db = FailingCommit(real)
    try:
        r = client.post("/api/v1/interfaces", json={**body, "policy": "drop"})
        assert r.status_code == 507, r.text
        assert fw.maps.policy(fw.attachments[("st0", a)].record.slot).policy == POLICY_PASS
        r = client.delete("/api/v1/interfaces/st0", params={"netns": a})
        assert r.status_code == 507, r.text
        assert link_info("st0", a)[2] == prog, "unguarded although the store still has it"
        assert ("st0", a) in fw.attachments
    finally:
        fw.store._db = real
    assert client.delete("/api/v1/interfaces/st0", params={"netns": a}).status_code == 200
