"""Another XDP program on a guarded interface (issue 10): xdp-filter and xdpfw each drop
what they should, in either load order, and xdpfw detaching leaves xdp-filter in place.

This kernel refuses freplace (BPF_PROG_TYPE_EXT) programs, so libxdp's multi-program
dispatcher cannot load here for anyone (xdp-filter itself says "Compatibility check for
dispatcher program failed: Operation not permitted" and falls back to a single program).
xdpfw therefore chains the other program behind its pass verdicts (a tail call through
chain_progs) and hands it the interface when it detaches (README "Other XDP programs").

xdp-filter runs through nsenter (network namespace only), so its pins land in the host's
bpffs; everything it pins is removed at the end when this test created it.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from netns_tests.traffic import ping, udp_delivered
from xdpfw.dataplane.attach import link_info

XDP_FILTER_PINS = "/sys/fs/bpf/xdp-filter"
BLOCKED_BY_FILTER, OPEN_PORT = 5353, 5354


def in_ns(ns: str, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(["nsenter", f"--net=/run/netns/{ns}", *argv], capture_output=True,
                       text=True, timeout=60)
    if check:
        assert r.returncode == 0, f"{' '.join(argv)} in {ns}: {r.stdout}{r.stderr}"
    return r


@pytest.fixture
def xdp_filter(pair):
    """Loads xdp-filter (skb mode) on an interface of the server namespace, and cleans up."""
    if shutil.which("xdp-filter") is None:
        pytest.fail("xdp-filter is missing: scripts/setup.sh installs xdp-tools")
    existed = os.path.exists(XDP_FILTER_PINS)
    loaded: list[str] = []

    def load(ifname: str) -> int:
        in_ns(pair.server, "xdp-filter", "load", "-m", "skb", ifname)
        loaded.append(ifname)
        in_ns(pair.server, "xdp-filter", "port", str(BLOCKED_BY_FILTER), "-p", "udp")
        return link_info(ifname, pair.server)[2]

    yield load
    for ifname in loaded:
        in_ns(pair.server, "xdp-filter", "unload", ifname, check=False)
    if not existed:
        shutil.rmtree(XDP_FILTER_PINS, ignore_errors=True)


def both_act(daemon, pair) -> None:
    """xdpfw drops ICMP from the client; xdp-filter drops UDP to its port; the rest passes."""
    c, s = pair.client, pair.server
    assert not ping(c, pair.server4).ok, "xdpfw's drop rule did not act"
    assert udp_delivered(c, s, pair.server4, BLOCKED_BY_FILTER, 10) == 0, \
        "xdp-filter's port rule did not act behind xdpfw"
    assert udp_delivered(c, s, pair.server4, OPEN_PORT, 10) == 10, "both should pass this"


def test_xdp_filter_first_then_xdpfw(daemon, pair, xdp_filter):
    api = daemon.client()
    filt = xdp_filter(pair.server_if)
    assert udp_delivered(pair.client, pair.server, pair.server4, BLOCKED_BY_FILTER, 5) == 0
    r = api.post("/api/v1/interfaces", json={"name": pair.server_if, "netns": pair.server,
                                             "mode": "auto"})
    assert r.status_code == 201, r.text
    assert r.json()["chained_prog_id"] == filt and r.json()["mode_in_use"] == "generic", r.json()
    rule = api.post("/api/v1/rules", json={"prefix": f"{pair.client4}/32", "action": "drop",
                                           "proto": "icmp"}).json()
    try:
        both_act(daemon, pair)
        r = api.delete(f"/api/v1/interfaces/{pair.server_if}", params={"netns": pair.server})
        assert r.status_code == 200, r.text
        assert link_info(pair.server_if, pair.server)[2] == filt, "xdp-filter was not put back"
        assert ping(pair.client, pair.server4).ok
        assert udp_delivered(pair.client, pair.server, pair.server4, BLOCKED_BY_FILTER, 5) == 0
    finally:
        api.delete(f"/api/v1/rules/{rule['id']}")


def test_xdpfw_first_then_xdp_filter_chained_by_id(daemon, pair, xdp_filter):
    api = daemon.client()
    body = {"name": pair.server_if, "netns": pair.server, "mode": "generic"}
    assert api.post("/api/v1/interfaces", json=body).status_code == 201
    rule = api.post("/api/v1/rules", json={"prefix": f"{pair.client4}/32", "action": "drop",
                                           "proto": "icmp"}).json()
    try:
        # With no dispatcher, xdp-filter cannot load over another program ...
        busy = in_ns(pair.server, "xdp-filter", "load", "-m", "skb", pair.server_if, check=False)
        assert busy.returncode != 0, "xdp-filter replaced xdpfw's program"
        # ... so it loads where it can (a spare veth) and xdpfw chains it by id.
        in_ns(pair.server, "ip", "link", "add", "xf0", "type", "veth", "peer", "name", "xf1")
        in_ns(pair.server, "ip", "link", "set", "xf0", "up")
        filt = xdp_filter("xf0")
        r = api.post("/api/v1/interfaces", json={**body, "chain_prog_id": filt})
        assert r.status_code == 200 and r.json()["chained_prog_id"] == filt, r.text
        both_act(daemon, pair)
        r = api.delete(f"/api/v1/interfaces/{pair.server_if}", params={"netns": pair.server})
        assert r.status_code == 200, r.text
        assert link_info(pair.server_if, pair.server)[2] == filt, "xdp-filter is not in place"
        assert udp_delivered(pair.client, pair.server, pair.server4, BLOCKED_BY_FILTER, 5) == 0
        assert ping(pair.client, pair.server4).ok
    finally:
        api.delete(f"/api/v1/rules/{rule['id']}")
