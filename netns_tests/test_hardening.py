"""The control plane under attack, on a real `xdpfw serve`: a second daemon on the same state,
file modes, a full disk."""

from __future__ import annotations

import contextlib
import hashlib
import os
import sqlite3
import stat
import subprocess
import time
from pathlib import Path

import pytest

from netns_tests.conftest import Daemon, new_pin_dir

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "t0ken"
MB = 1 << 20


def status(pid: int, field: str) -> int:
    """A /proc/PID/status field in kB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


@pytest.fixture
def own_daemon(tmp_path):
    made: list[Daemon] = []

    def make(**kw) -> Daemon:
        d = Daemon(tmp_path / f"d{len(made)}", new_pin_dir(), **kw)
        d.workdir.mkdir()
        made.append(d)
        return d

    yield make
    for d in made:
        d.stop()
        subprocess.run(["rm", "-rf", d.pin_dir], check=False)


# -- one daemon per state directory ------------------------------------------------------------


def footprint(d: Daemon) -> dict:
    """What a second daemon must leave as it was: socket, pid file, store, pins."""
    def ident(p: Path) -> tuple:
        st = p.stat()
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    store = d.state / "xdpfw.sqlite3"
    return {
        "socket": ident(Path(d.socket)),
        "pid": (ident(d.state / "xdpfw.pid"), (d.state / "xdpfw.pid").read_text()),
        "store": (ident(store), hashlib.sha256(store.read_bytes()).hexdigest()),
        "pins": {p.name: p.stat().st_ino for p in Path(d.pin_dir).iterdir()},
    }


def test_a_second_daemon_on_the_same_state_touches_nothing(own_daemon):
    first = own_daemon()
    # A state directory from an older version: world-readable store and directory.
    first.state.mkdir(mode=0o755)
    os.chmod(first.state, 0o755)
    sqlite3.connect(first.state / "xdpfw.sqlite3").close()
    os.chmod(first.state / "xdpfw.sqlite3", 0o644)
    first.start()
    first.client().post("/api/v1/rules", json={"prefix": "192.0.2.0/24"})
    modes = {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in first.state.iterdir()}
    assert oct(stat.S_IMODE(first.state.stat().st_mode)) == "0o700"
    assert set(modes.values()) == {"0o600"}, modes
    assert {"xdpfw.sqlite3", "xdpfw.sqlite3-wal", "xdpfw.pid", "xdpfw.lock"} <= modes.keys()

    before = footprint(first)
    second_socket = first.workdir / "second.sock"
    for argv in (first.argv(), [*first.argv(), "--socket", str(second_socket)]):
        start = time.monotonic()
        r = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        assert r.returncode != 0, f"a second daemon ran:\n{r.stdout}{r.stderr}"
        assert f"pid {first.proc.pid}" in r.stderr, r.stderr
        assert time.monotonic() - start < 10, "it got as far as building the program"
        assert footprint(first) == before, "the second daemon touched the first one's files"
        assert not second_socket.exists()

    # Another state directory, but the first one's socket: not taken over either.
    other = own_daemon(socket_path=first.socket)
    r = subprocess.run(other.argv(), capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "another server is listening" in r.stderr, r.stderr
    assert footprint(first) == before

    with first.client() as c:
        assert c.get("/healthz").status_code == 200
        assert c.post("/api/v1/rules", json={"prefix": "198.51.100.0/24"}).status_code == 201


# -- a full disk -------------------------------------------------------------------------------


@pytest.fixture
def tiny_state(own_daemon):
    """A daemon whose state directory is a 4 MiB tmpfs."""
    d = own_daemon()
    d.state.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", str(d.state)],
                   check=True)
    try:
        d.start()
        yield d
        d.stop()
    finally:
        subprocess.run(["umount", "-l", str(d.state)], check=False)


def map_entries(d: Daemon) -> list[str]:
    text = d.client().get("/metrics").text
    return sorted(line for line in text.splitlines() if line.startswith("xdpfw_map_entries"))


def test_a_full_disk_is_a_507_and_changes_nothing(tiny_state):
    d = tiny_state
    api = d.client()
    assert api.post("/api/v1/rules", json={"prefix": "192.0.2.0/24"}).status_code == 201
    filler = d.state / "filler"
    with open(filler, "wb") as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * 65536)
            f.flush()
    rules, maps = api.get("/api/v1/rules").json(), map_entries(d)
    r = api.post("/api/v1/rules", json={"prefix": "198.51.100.0/24"})
    assert r.status_code == 507, r.text
    assert r.headers["content-type"] == "application/json" and "full" in r.json()["detail"]
    text = "\n".join(f"10.1.{i >> 8}.{i & 255}" for i in range(5000))
    r = api.post("/api/v1/rules/bulk", content=text, headers={"content-type": "text/plain"})
    assert r.status_code == 507, r.text
    assert api.get("/api/v1/rules").json() == rules and map_entries(d) == maps, d.log()

    filler.unlink()
    assert api.post("/api/v1/rules", json={"prefix": "198.51.100.0/24"}).status_code == 201
    with sqlite3.connect(f"file:{d.state / 'xdpfw.sqlite3'}?mode=ro", uri=True) as db:
        stored = [r[0] for r in db.execute("SELECT plen FROM rules")]
    assert len(stored) == 2, "the store holds what the refused requests sent"
