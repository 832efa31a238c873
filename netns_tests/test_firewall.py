"""End to end: rules added over REST stop real packets between namespaces.

The daemon is a real `xdpfw serve`; traffic is ICMP, UDP and TCP over IPv4 and IPv6, from the
client namespace to the server namespace, whose veth end is guarded in native or generic mode.
Every traffic check is also asked of GET /api/v1/explain for the same packet on the same
interface (`explained`): what the program says it decides must be what real traffic met.
"""

from __future__ import annotations

import pytest

from netns_tests.traffic import ping, tcp_connects, udp_delivered
from xdpfw.dataplane.attach import link_info

MODES = ["native", "generic"]


def add_rule(api, **rule) -> dict:
    r = api.post("/api/v1/rules", json=rule)
    assert r.status_code == 201, r.text
    return r.json()


def explained(api, pair, ok: bool, proto: str, dport: int | None = None, v6: bool = False
              ) -> bool:
    """`ok` (the real traffic got through), after checking that explain, for the same packet
    on the guarded interface, says so too."""
    src, dst = (pair.client6, pair.server6) if v6 else (pair.client4, pair.server4)
    params = {"src": src, "dst": dst, "proto": proto, "interface": pair.server_if,
              "netns": pair.server} | ({"dport": dport} if dport else {})
    r = api.get("/api/v1/explain", params=params)
    assert r.status_code == 200, r.text
    e = r.json()
    assert e["verdict"] == ("pass" if ok else "drop"), (
        f"real traffic ({proto} {dport or ''} from {src}) was "
        f"{'delivered' if ok else 'dropped'}; explain says {e['verdict']} ({e['reason']}, "
        f"rule {e['rule']})")
    return ok


def iface_counters(api, pair) -> dict:
    for i in api.get("/api/v1/stats").json()["interfaces"]:
        if i["netns"] == pair.server:
            return i
    raise AssertionError("guarded interface missing from /api/v1/stats")


@pytest.mark.parametrize("mode", MODES)
def test_rules_block_and_allow_real_traffic(daemon, pair, guarded, mode):
    api = daemon.client()
    att = guarded(mode)
    assert att["mode_in_use"] == mode, att
    c, s = pair.client, pair.server

    # Baseline: everything flows.
    for res, proto, dport, v6 in ((ping(c, pair.server4), "icmp", None, False),
                                  (ping(c, pair.server6), "icmp", None, True),
                                  (tcp_connects(c, s, pair.server4, 8080), "tcp", 8080, False),
                                  (tcp_connects(c, s, pair.server6, 8080), "tcp", 8080, True)):
        assert explained(api, pair, res.ok, proto, dport, v6), res.detail
    assert explained(api, pair, udp_delivered(c, s, pair.server4, 5353, 20) == 20, "udp", 5353)

    # Protocol and port rules drop only what they name.
    add_rule(api, prefix=f"{pair.client4}/32", action="drop", proto="icmp")
    add_rule(api, prefix="10.201.0.0/24", action="drop", proto="udp", dport=5353)
    add_rule(api, prefix="fd20::/64", action="drop", proto="tcp", dport=8080)
    assert not explained(api, pair, ping(c, pair.server4).ok, "icmp"), \
        "ICMP from a blocked /32 got through"
    assert explained(api, pair, ping(c, pair.server6).ok, "icmp", v6=True), \
        "IPv6 ping must still pass"
    assert not explained(api, pair, udp_delivered(c, s, pair.server4, 5353, 20) > 0, "udp",
                         5353)
    assert explained(api, pair, udp_delivered(c, s, pair.server4, 5354, 20) == 20, "udp", 5354)
    assert not explained(api, pair, tcp_connects(c, s, pair.server6, 8080).ok, "tcp", 8080,
                         v6=True), "TCP/8080 over IPv6 got through"
    res = tcp_connects(c, s, pair.server4, 8080)
    assert explained(api, pair, res.ok, "tcp", 8080), res.detail

    # Longest prefix wins: drop the /64, allow the client's /128 back.
    add_rule(api, prefix="fd20::/64", action="drop")
    assert not explained(api, pair, ping(c, pair.server6).ok, "icmp", v6=True)
    add_rule(api, prefix=f"{pair.client6}/128", action="pass")
    assert explained(api, pair, ping(c, pair.server6).ok, "icmp", v6=True)

    counters = iface_counters(api, pair)
    assert counters["dropped"]["packets"] > 0, counters
    assert counters["mode"] == mode

    # Deleting the rules restores traffic.
    for rule in api.get("/api/v1/rules").json()["items"]:
        assert api.delete(f"/api/v1/rules/{rule['id']}").status_code == 200
    assert explained(api, pair, ping(c, pair.server4).ok, "icmp")
    assert explained(api, pair, udp_delivered(c, s, pair.server4, 5353, 20) == 20, "udp", 5353)


def test_drop_policy_allow_list_keeps_neighbour_resolution(daemon, pair, guarded):
    api = daemon.client()
    guarded("native", policy="drop")
    assert not explained(api, pair, ping(pair.client, pair.server4).ok, "icmp"), \
        "drop policy let unlisted ICMP through"
    # ARP was not dropped: the client resolved the server even though the ping failed.
    from xdpfw.netns import link_mac, rtnl

    with rtnl(pair.client) as ip:
        neigh = [n.get_attr("NDA_LLADDR") for n in ip.get_neighbours()
                 if n.get_attr("NDA_DST") == pair.server4]
    assert link_mac(pair.server, pair.server_if) in neigh, f"ARP was dropped: {neigh}"
    add_rule(api, prefix="10.201.0.0/24", action="pass")
    add_rule(api, prefix="fd20::/64", action="pass")
    assert explained(api, pair, ping(pair.client, pair.server4).ok, "icmp")
    assert explained(api, pair, ping(pair.client, pair.server6).ok, "icmp", v6=True), \
        "IPv6 ND must pass a drop policy"


def test_offload_fails_clearly_and_attaches_nothing(daemon, pair):
    api = daemon.client()
    r = api.post("/api/v1/interfaces", json={
        "name": pair.server_if, "netns": pair.server, "mode": "offload"})
    assert r.status_code == 422, r.text
    assert "cannot offload XDP" in r.json()["detail"], r.text
    _, mode, prog_id, _ = link_info(pair.server_if, pair.server)
    assert mode is None and prog_id is None, f"something was attached: {mode} {prog_id}"
    assert api.get("/api/v1/interfaces").json() == []


def test_mode_change_is_refused_and_keeps_the_old_program(daemon, pair, guarded):
    api = daemon.client()
    guarded("native")
    _, _, prog_before, _ = link_info(pair.server_if, pair.server)
    r = api.post("/api/v1/interfaces", json={
        "name": pair.server_if, "netns": pair.server, "mode": "generic"})
    assert r.status_code == 409 and "detach it" in r.text, r.text
    _, mode, prog_after, _ = link_info(pair.server_if, pair.server)
    assert (mode, prog_after) == ("native", prog_before)
    # Changing the policy in the same mode is an in-place update.
    r = api.post("/api/v1/interfaces", json={
        "name": pair.server_if, "netns": pair.server, "mode": "native", "policy": "drop"})
    assert r.status_code == 200 and r.json()["policy"] == "drop", r.text


def test_restart_keeps_rules_and_never_stops_filtering(daemon, pair, guarded):
    api = daemon.client()
    guarded("native")
    add_rule(api, prefix="10.201.0.0/24", action="drop", proto="udp")
    rules_before = api.get("/api/v1/rules").json()["items"]
    assert not explained(api, pair, udp_delivered(pair.client, pair.server, pair.server4, 7000,
                                                  30) > 0, "udp", 7000)

    daemon.stop()
    try:
        # Control plane down: the attached program and pinned maps go on dropping.
        assert udp_delivered(pair.client, pair.server, pair.server4, 7000, 50) == 0
    finally:
        daemon.start()
    api = daemon.client()
    after = api.get("/api/v1/rules").json()["items"]
    assert [(r["id"], r["prefix"], r["proto"]) for r in after] == [
        (r["id"], r["prefix"], r["proto"]) for r in rules_before]
    # The per-rule counter lives in a pinned map: it kept counting while the daemon was down.
    assert after[0]["packets"] >= 80, after
    assert not explained(api, pair, udp_delivered(pair.client, pair.server, pair.server4, 7000,
                                                  30) > 0, "udp", 7000)
    ifaces = api.get("/api/v1/interfaces").json()
    assert [(i["name"], i["netns"]) for i in ifaces] == [(pair.server_if, pair.server)]
