"""Two stores, one pin dir: a daemon started with a new state dir over pins another store
claimed used to log "in step" and run over rules its API could not list or delete. Now it
refuses, naming both directories; told to adopt them, it enforces only what it lists.
"""

from __future__ import annotations

import shutil
import subprocess
import uuid

import pytest

from conftest import require_kernel
from netns_tests.conftest import Daemon
from netns_tests.traffic import ping


@pytest.fixture
def two_daemons(tmp_path):
    require_kernel()
    pin_dir = f"/sys/fs/bpf/xdpfw-test-{uuid.uuid4().hex[:8]}"
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a, b = Daemon(tmp_path / "a", pin_dir), Daemon(tmp_path / "b", pin_dir)
    yield a, b
    for d in (a, b):
        d.stop()
    shutil.rmtree(pin_dir, ignore_errors=True)


def test_a_daemon_on_another_store_refuses_the_pins_or_adopts_them(two_daemons, pair):
    a, b = two_daemons
    a.start()
    api = a.client()
    r = api.post("/api/v1/interfaces", json={"name": pair.server_if, "netns": pair.server,
                                             "mode": "generic"})
    assert r.status_code == 201, r.text
    r = api.post("/api/v1/rules", json={"prefix": f"{pair.client4}/32", "action": "drop"})
    assert r.status_code == 201, r.text
    assert not ping(pair.client, pair.server4).ok
    a.stop()  # the data plane keeps guarding

    refused = subprocess.run(b.argv(), capture_output=True, text=True, timeout=60)
    out = refused.stdout + refused.stderr
    assert refused.returncode != 0, out
    assert str(a.workdir / "state") in out and str(b.workdir / "state") in out, out
    assert a.pin_dir in out, out
    assert not ping(pair.client, pair.server4).ok, "refusing must not touch the pins"

    b.extra_args.append("--adopt-pins")
    b.start()
    assert b.client().get("/api/v1/rules").json()["items"] == []
    assert ping(pair.client, pair.server4).ok, "a rule b's API does not list still drops"
    assert f"1 IPv4 /24s changed verdict: {pair.client4.rsplit('.', 1)[0]}.0/24" in b.log(), \
        b.log()
