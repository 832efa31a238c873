"""A million-entry set replaced by a million-entry set that shares half of it, on a real
daemon, while a flood from addresses of the shared half runs: not one of its packets may
reach the protected namespace (0 delivered). Before and after, an address only in the old
set and one only in the new set get what their set says.

The flood comes from 28 addresses that both sets cover: 16 under a /28 (and four of them
as /32s too) that both sets hold; 8 under a /29 of the old set that the new one splits into
two /30s (so the new entries must be in before the old one goes); 4 under a /30 whose rule
changes (another comment: a new rule, its verdict rewritten in place). The old half has a
/26 the client also sends from, the new half another. The other ~1M prefixes are random,
outside 10/8. The flood is paced and bounded in count and time.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import require_kernel
from netns_tests.conftest import Daemon, new_pin_dir
from netns_tests.test_restart import SINK, _finish, _spawn
from netns_tests.traffic import PACED_FLOOD, udp_delivered
from tests.prefix_gen import text, v4_prefixes
from xdpfw.rules.table import Prefixes

HALF = 500_000
PORT = 9997
FLOOD_SOURCES = [f"10.201.0.{i}" for i in range(16, 44)]  # 10.201.0.16/28 .. .40/30
SHARED = ["10.201.0.16/28", "10.201.0.17", "10.201.0.18", "10.201.0.19", "10.201.0.20"]
OLD_SHAPE = ["10.201.0.32/29", "10.201.0.40/30 # by feed A"]
NEW_SHAPE = ["10.201.0.32/30", "10.201.0.36/30", '@rules {"comment": "feed B"}',
             "10.201.0.40/30"]
OLD_ONLY, OLD_SRC = "10.201.0.64/26", "10.201.0.70"
NEW_ONLY, NEW_SRC = "10.201.0.128/26", "10.201.0.130"
FLOOD_PPS = 20_000
FLOOD_MAX = 600_000
FLOOD_MAX_S = 120


@pytest.fixture(scope="module")
def big_daemon(tmp_path_factory):
    """A daemon sized for two million rules (the old set and the new one's additions
    coexist while a replace runs)."""
    require_kernel()
    d = Daemon(tmp_path_factory.mktemp("xdpfw-sets"), new_pin_dir(),
               extra_args=["--max-rules", str(1 << 21)])
    d.start(timeout=120)
    yield d
    d.stop()
    shutil.rmtree(d.pin_dir, ignore_errors=True)


def body(random_part: Prefixes, targeted: list[str]) -> bytes:
    """The random prefixes, then the targeted lines (which may open a section)."""
    return text(random_part) + "\n".join(targeted).encode() + b"\n"


def test_a_flood_from_the_shared_half_is_dropped_throughout_a_million_set_replace(
        big_daemon, pair):
    client = big_daemon.client()
    client.timeout = 300
    for addr in [*FLOOD_SOURCES, OLD_SRC, NEW_SRC]:
        subprocess.run(["ip", "-n", pair.client, "addr", "add", f"{addr}/24", "dev",
                        pair.client_if], check=True)
    r = client.post("/api/v1/interfaces", json={"name": pair.server_if, "netns": pair.server,
                                                "mode": "native"})
    assert r.status_code == 201, r.text
    # Random prefixes outside 10/8: the shared half, the old half, the new half.
    rng = np.random.default_rng(5)
    pool = v4_prefixes(rng, 3 * HALF, first_octets=[o for o in range(1, 224) if o != 10])
    shared, old, new = (pool.take(slice(i, i + HALF - 3)) for i in (0, HALF, 2 * HALF))
    old_body = body(Prefixes.concat([shared, old]), [*SHARED, OLD_ONLY, *OLD_SHAPE])
    new_body = body(Prefixes.concat([shared, new]), [*SHARED, NEW_ONLY, *NEW_SHAPE])

    r = client.put("/api/v1/sets/feed", content=old_body, headers={"content-type": "text/plain"})
    assert r.status_code == 200 and r.json()["added"] == 2 * HALF + 2, r.text[:300]
    assert udp_delivered(pair.client, pair.server, pair.server4, PORT, 10) == 10  # from .1
    assert _from(pair, OLD_SRC) == 0, "the old set's /26 must drop before the replace"
    assert _from(pair, NEW_SRC) == 20, "the new set's /26 must pass before the replace"

    sink = _spawn(pair.server, SINK, pair.server4, str(PORT))
    flood = _spawn(pair.client, PACED_FLOOD, pair.server4, str(PORT), str(FLOOD_PPS),
                   str(FLOOD_MAX), str(FLOOD_MAX_S), *FLOOD_SOURCES)
    try:
        time.sleep(1.0)  # the flood is under way before the replace starts
        t0 = time.monotonic()
        r = client.put("/api/v1/sets/feed", content=new_body,
                       headers={"content-type": "text/plain"})
        took = time.monotonic() - t0
        time.sleep(1.0)  # and goes on after it answered
    finally:
        sent = _finish(flood)
        received = _finish(sink)
    assert r.status_code == 200, r.text[:300]
    assert sent > FLOOD_PPS, f"the flood sent only {sent} packets"
    assert received == 0, (f"{received} of {sent} flood packets from the shared half were "
                           f"delivered during a replace that took {took:.1f} s")
    report = r.json()
    assert (report["added"], report["removed"], report["kept"], report["changed"]) == (
        HALF - 3 + 1 + 2, HALF - 3 + 1 + 1, HALF - 3 + len(SHARED), 1), report
    print(f"replace of {2 * HALF} by {2 * HALF} rules sharing half: {took:.2f} s over HTTP, "
          f"{sent} flood packets sent, {received} delivered")
    hits = client.get("/api/v1/rules", params={"covering": FLOOD_SOURCES[0]}).json()["items"]
    assert hits and hits[0]["prefix"] == "10.201.0.16/28" and hits[0]["packets"] > 0, hits
    assert _from(pair, OLD_SRC) == 20, "the old set's /26 still drops after the replace"
    assert _from(pair, NEW_SRC) == 0, "the new set's /26 does not drop after the replace"
    client.delete(f"/api/v1/interfaces/{pair.server_if}", params={"netns": pair.server})
    assert client.delete("/api/v1/sets/feed").json()["removed"] == 2 * HALF + 3


def _from(pair, src: str, count: int = 20) -> int:
    """Datagrams from `src` (an address of the client's) that reach the server."""
    sink = _spawn(pair.server, SINK, pair.server4, str(PORT + 1))
    try:
        send = subprocess.run(
            ["ip", "netns", "exec", pair.client, sys.executable, "-c",
             "import socket,sys\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
             "s.bind((sys.argv[1],0))\n"
             "for _ in range(int(sys.argv[3])): s.sendto(b'x', (sys.argv[2], int(sys.argv[4])))",
             src, pair.server4, str(count), str(PORT + 1)],
            capture_output=True, text=True, timeout=15)
        time.sleep(0.3)
    finally:
        received = _finish(sink)
    assert send.returncode == 0, send.stderr
    return received
