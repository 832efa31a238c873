"""Restart and upgrade under a flood: not one packet that a rule drops may reach the protected
namespace while the control plane stops, crashes, starts again, or swaps the program.

The flood is bounded (paced, capped in count and time) and goes from the client namespace to a
UDP socket in the server namespace, both created by the test.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

import pytest

from netns_tests.traffic import PACED_FLOOD, udp_delivered
from xdpfw import netns as nsutil
from xdpfw.dataplane.attach import link_info

PORT = 9999
FLOOD_PPS = 10_000
FLOOD_MAX = 400_000  # packets: the hard bound of one flood
FLOOD_MAX_S = 90

# Counts datagrams until SIGTERM, then prints the count.
SINK = """
import signal, socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], int(sys.argv[2])))
n = 0
def done(*_):
    print(n, flush=True); sys.exit(0)
signal.signal(signal.SIGTERM, done)
print('ready', flush=True)
s.settimeout(0.2)
while True:
    try:
        s.recv(2048); n += 1
    except socket.timeout:
        pass
"""


def _spawn(ns: str, script: str, *args: str) -> subprocess.Popen:
    p = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", script, *args],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = p.stdout.readline().strip()
    if line != "ready":
        p.kill()
        raise AssertionError(f"helper in {ns} did not start: {line!r} {p.stderr.read()}")
    return p


def _finish(p: subprocess.Popen) -> int:
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=20)
    assert p.returncode == 0, f"helper failed rc={p.returncode}: {err}"
    return int(out.strip().splitlines()[-1])


@dataclass
class Flood:
    sent: int
    received: int
    tx_dropped: int  # lost on the client's veth before reaching XDP (ring full)


def tx_dropped(ns: str, ifname: str) -> int:
    with nsutil.rtnl(ns) as ip:
        link = ip.get_links(nsutil.ifindex(ns, ifname))[0]
    return link.get_attr("IFLA_STATS64")["tx_dropped"]


def rule_packets(daemon, rule_id: int) -> int:
    r = daemon.client().get(f"/api/v1/rules/{rule_id}")
    assert r.status_code == 200, r.text
    return r.json()["packets"]


def xdpfw_cli(daemon, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "xdpfw", *args, "--socket", daemon.socket],
        capture_output=True, text=True, timeout=120,
    )


@pytest.fixture
def blocked(daemon, pair, guarded):
    """The server end guarded (native), UDP from the client's address dropped by a rule;
    the path is first shown to deliver without the rule."""
    guarded("native")
    delivered = udp_delivered(pair.client, pair.server, pair.server4, PORT, 20)
    assert delivered == 20, f"without a rule only {delivered}/20 datagrams arrived"
    r = daemon.client().post("/api/v1/rules", json={
        "prefix": f"{pair.client4}/32", "action": "drop", "proto": "udp", "comment": "flood"})
    assert r.status_code == 201, r.text
    return r.json()["id"]


def flood_while(daemon, pair, rule_id: int, disrupt) -> Flood:
    """Flood, call disrupt() in the middle of it, and count what got through."""
    drops_before = tx_dropped(pair.client, pair.client_if)
    sink = _spawn(pair.server, SINK, pair.server4, str(PORT))
    flood = _spawn(pair.client, PACED_FLOOD, pair.server4, str(PORT), str(FLOOD_PPS),
                   str(FLOOD_MAX), str(FLOOD_MAX_S))
    try:
        start = rule_packets(daemon, rule_id)
        assert nsutil.wait_until(lambda: rule_packets(daemon, rule_id) > start + 2000, 10), \
            "the flood does not reach the rule"
        disrupt()
        # A little more flood against the restarted control plane.
        mid = rule_packets(daemon, rule_id)
        assert nsutil.wait_until(lambda: rule_packets(daemon, rule_id) > mid + 2000, 10), \
            f"no drops counted after the disruption:\n{daemon.log()}"
    finally:
        sent = _finish(flood)
        time.sleep(0.3)  # the last datagrams in flight
        received = _finish(sink)
    return Flood(sent, received, tx_dropped(pair.client, pair.client_if) - drops_before)


def check(daemon, rule_id: int, f: Flood, what: str) -> None:
    dropped = rule_packets(daemon, rule_id)
    summary = (f"{what}: sent {f.sent}, received {f.received}, dropped by the rule {dropped}, "
               f"lost on the client veth {f.tx_dropped}")
    assert f.received == 0, f"{summary}\n{daemon.log()}"
    assert dropped == f.sent - f.tx_dropped, f"{summary}: the rule's counter is off"


def test_restart_and_crash_under_flood_let_nothing_through(daemon, pair, blocked):
    state_dir = str(daemon.workdir / "state")

    def restarts() -> None:
        # An operator's stop: the API goes away, the program stays attached.
        stop = xdpfw_cli(daemon, "stop", "--state-dir", state_dir)
        assert stop.returncode == 0, f"xdpfw stop: {stop.stdout}{stop.stderr}"
        assert "keeps guarding" in stop.stdout, stop.stdout
        assert link_info(pair.server_if, pair.server)[2] is not None, "stop detached XDP"
        daemon.proc.wait(timeout=10)
        daemon.start()
        # A crash: no clean-up code runs at all.
        daemon.proc.send_signal(signal.SIGKILL)
        daemon.proc.wait(timeout=10)
        daemon.start()

    f = flood_while(daemon, pair, blocked, restarts)
    check(daemon, blocked, f, "stop, start, SIGKILL, start under flood")


def test_upgrade_under_flood_lets_nothing_through(daemon, pair, blocked):
    before = link_info(pair.server_if, pair.server)[2]
    out: list[subprocess.CompletedProcess] = []
    f = flood_while(daemon, pair, blocked, lambda: out.append(xdpfw_cli(daemon, "upgrade")))
    up = out[0]
    assert up.returncode == 0, f"xdpfw upgrade: {up.stdout}{up.stderr}"
    after = link_info(pair.server_if, pair.server)[2]
    assert after != before and f"id {before} -> {after}" in up.stdout, (before, after, up.stdout)
    check(daemon, blocked, f, "program upgrade under flood")


def test_stop_detach_removes_everything(daemon, pair, guarded):
    guarded("generic")
    assert link_info(pair.server_if, pair.server)[2] is not None
    stop = xdpfw_cli(daemon, "stop", "--detach", "--state-dir", str(daemon.workdir / "state"))
    try:
        assert stop.returncode == 0, f"xdpfw stop --detach: {stop.stdout}{stop.stderr}"
        daemon.proc.wait(timeout=10)
        assert link_info(pair.server_if, pair.server)[1:3] == (None, None), "XDP still attached"
        assert not os.path.exists(daemon.pin_dir), os.listdir(daemon.pin_dir)
        assert not os.path.exists(daemon.socket)
    finally:
        daemon.start()  # the module's daemon serves the next tests
    assert daemon.client().get("/api/v1/interfaces").json() == [], "detached yet remembered"
