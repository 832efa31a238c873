"""The load balancer in the real XDP program, under BPF_PROG_TEST_RUN: rewritten frames,
verdicts, conntrack stickiness, counters. Maps are written through LbMaps directly."""

from __future__ import annotations

import collections

import pytest

from tests import packets as P
from xdpfw.dataplane import abi
from xdpfw.dataplane.lb_maps import LbMaps, Vip
from xdpfw.lb.maglev import build_table
from xdpfw.rules.model import Action, parse_prefix
from xdpfw.service import RuleSpec

pytestmark = pytest.mark.bpf

VIP4, VIP6, PORT = "10.99.0.100", "fd99::100", 80
CLIENT4, CLIENT6 = "10.99.1.7", "fd99:1::7"
LB_MAC = P.DST_MAC  # the frame arrives addressed to the appliance
MACS = {1: "02:00:00:00:0b:01", 2: "02:00:00:00:0b:02", 3: "02:00:00:00:0b:03"}
EGRESS_MAC = "02:00:00:00:0e:01"
TX_PORT = 0
LO_IFINDEX = 1


@pytest.fixture
def lb(fw):
    maps = fw.dp.lb
    maps.reset_service_counters(0)
    for slot in MACS:
        maps.reset_backend_counters(slot)
    vips: list[Vip] = []
    maps.vips = vips  # what to remove at teardown
    yield maps
    for vip in vips:
        maps.del_service(vip)
    maps.set_config(0)
    maps.clear_conntrack()
    for slot in MACS:
        maps.clear_backend(slot)
    maps.del_tx_port(TX_PORT)


def service(lb: LbMaps, vip: str, fwd=abi.LB_FWD_TX, slot=0, backends=(1,), proto="tcp",
            steer=()) -> Vip:
    """A service whose row is filled by a real Maglev table over `backends` (slots)."""
    v = Vip(vip, PORT, proto)
    for s in backends:
        lb.set_backend(s, MACS[s], EGRESS_MAC, TX_PORT, gen=100 + s)
    write_table(lb, slot, backends)
    lb.set_service(v, slot, fwd, steer)
    lb.vips.append(v)
    lb.set_config(len(lb.vips))
    return v


def write_table(lb: LbMaps, slot: int, backends) -> None:
    backends = list(backends)
    table = build_table([(str(b), 1) for b in backends], lb.table_size)
    lb.write_row(slot, [backends[i] if i >= 0 else abi.LB_NO_BACKEND for i in table])


def frame(src=CLIENT4, dst=VIP4, dport=PORT, sport=40000, proto=P.TCP) -> bytes:
    if ":" in dst:
        return P.eth(P.ETH_IPV6, P.ipv6(src, dst, proto, P.l4(proto, dport, sport)))
    return P.eth(P.ETH_IP, P.ipv4(src, dst, proto, P.l4(proto, dport, sport)))


def mac(b: bytes) -> str:
    return ":".join(f"{x:02x}" for x in b)


def backend_of(out: bytes) -> int:
    found = [s for s, m in MACS.items() if m == mac(out[:6])]
    assert found, f"dst MAC {mac(out[:6])} is no backend's"
    return found[0]


@pytest.mark.parametrize(("src", "vip"), [(CLIENT4, VIP4), (CLIENT6, VIP6)])
def test_tx_rewrites_macs_only(run, lb, src, vip):
    service(lb, vip)
    pkt = frame(src, vip)
    res = run(pkt)
    assert res.verdict == "XDP_TX", f"{vip}: expected XDP_TX, got {res.verdict}"
    assert mac(res.data[:6]) == MACS[1], f"dst MAC {mac(res.data[:6])} != backend {MACS[1]}"
    assert res.data[6:12] == LB_MAC, f"src MAC {mac(res.data[6:12])} != ours {mac(LB_MAC)}"
    assert res.data[12:] == pkt[12:], "bytes after the MACs changed (DSR rewrites L2 only)"


def test_redirect_rewrites_both_macs(run, lb):
    lb.set_tx_port(TX_PORT, LO_IFINDEX)
    service(lb, VIP4, fwd=abi.LB_FWD_REDIRECT)
    pkt = frame()
    res = run(pkt)
    assert res.verdict == "XDP_REDIRECT", f"expected XDP_REDIRECT, got {res.verdict}"
    assert mac(res.data[:6]) == MACS[1], f"dst MAC {mac(res.data[:6])} != backend"
    assert mac(res.data[6:12]) == EGRESS_MAC, f"src MAC {mac(res.data[6:12])} != egress NIC"
    assert res.data[12:] == pkt[12:]


def test_redirect_without_port_drops(run, lb):
    service(lb, VIP4, fwd=abi.LB_FWD_REDIRECT)
    assert run(frame()).verdict == "XDP_DROP", "no tx_ports entry must drop, not misdeliver"


def test_other_traffic_passes_untouched(run, lb):
    service(lb, VIP4)
    cases = [
        ("other port", frame(dport=81)),
        ("udp to a tcp service", frame(proto=P.UDP)),
        ("other address", frame(dst="10.99.0.101")),
        ("icmp to the VIP", P.icmp4(CLIENT4, VIP4)),
        ("arp", P.arp(CLIENT4)),
    ]
    bad = []
    for desc, pkt in cases:
        res = run(pkt)
        if res.verdict != "XDP_PASS" or res.data[: len(pkt)] != pkt:
            bad.append(f"{desc}: {res.verdict}, frame changed: {res.data[:len(pkt)] != pkt}")
    assert not bad, "\n".join(bad)


def test_no_backend_drops_and_counts(run, lb):
    service(lb, VIP4, backends=())
    assert run(frame()).verdict == "XDP_DROP"
    totals = lb.service_totals(0)
    assert totals["no_backend"][0] == 1 and totals["forwarded"][0] == 0, totals


def test_firewall_decides_first(run, fw, lb):
    service(lb, VIP4)
    fw.add_rules([RuleSpec(parse_prefix("10.99.1.0/24"), Action.DROP)])
    assert run(frame()).verdict == "XDP_DROP", "a drop rule must beat the load balancer"
    assert run(frame(src="10.99.2.1")).verdict == "XDP_TX"


def test_flows_spread_over_backends(run, lb):
    service(lb, VIP4, backends=(1, 2, 3))
    n = 600
    seen = collections.Counter(
        backend_of(run(frame(sport=20000 + i)).data) for i in range(n)
    )
    for slot in (1, 2, 3):
        share = seen[slot] / n
        assert 0.23 < share < 0.43, f"backend {slot} got {share:.0%} of {n} flows: {seen}"


def test_conntrack_keeps_flow_when_table_changes(run, lb):
    service(lb, VIP4, backends=(1,))
    first = backend_of(run(frame(sport=1111)).data)
    assert first == 1
    # The table now sends everything to 2: the known flow stays, a new flow moves.
    lb.set_backend(2, MACS[2], EGRESS_MAC, TX_PORT, gen=102)
    write_table(lb, 0, [2])
    assert backend_of(run(frame(sport=1111)).data) == 1, "established flow changed backend"
    assert backend_of(run(frame(sport=2222)).data) == 2, "new flow did not follow the table"
    # Backend 1 removed (slot cleared): its flows are re-balanced.
    lb.clear_backend(1)
    assert backend_of(run(frame(sport=1111)).data) == 2, "flow stuck on a removed backend"


def test_reused_slot_does_not_inherit_flows(run, lb):
    service(lb, VIP4, backends=(1, 2))
    sport = next(s for s in range(3000, 4000) if backend_of(run(frame(sport=s)).data) == 1)
    # Slot 1 gets a different backend (new generation) while the table still says 2 only.
    write_table(lb, 0, [2])
    lb.set_backend(1, MACS[3], EGRESS_MAC, TX_PORT, gen=999)
    assert backend_of(run(frame(sport=sport)).data) == 2, "flow followed a reused slot"


def test_counters_per_service_and_backend(run, lb):
    service(lb, VIP4, backends=(1,))
    pkt = frame()
    run(pkt, repeat=5)
    fwd = lb.service_totals(0)["forwarded"]
    assert fwd == (5, 5 * len(pkt)), f"service counters {fwd}"
    assert lb.backend_totals(1) == (5, 5 * len(pkt)), lb.backend_totals(1)


def test_cpu_steer_redirects_to_cpumap(run, lb):
    lb.set_cpu(0)
    service(lb, VIP4, steer=[0])
    res = run(frame())
    assert res.verdict == "XDP_REDIRECT", f"steered service: {res.verdict}"
    assert res.data[:6] == P.DST_MAC, "steering hands the frame to the stack unchanged"
    # Global steering of passing traffic.
    lb.set_config(len(lb.vips), steer_cpus=[0])
    assert run(frame(dport=22)).verdict == "XDP_REDIRECT"


def outcome(fw, run, pkt: bytes) -> tuple[str, str, dict]:
    """(verdict, the reason counted, how the test instance's interface counters moved)."""
    before, ifaces = fw.maps.reason_totals(), fw.maps.iface_totals(0)
    verdict = run(pkt).verdict
    after, ifaces_after = fw.maps.reason_totals(), fw.maps.iface_totals(0)
    moved = [r for r in after if after[r][0] != before[r][0]]
    assert len(moved) == 1, f"one packet counted under {moved}"
    cols = {k: ifaces_after[k][0] - ifaces[k][0] for k in ifaces}
    return verdict, moved[0], cols


def test_lb_outcomes_are_never_counted_as_pass(run, fw, lb):
    """Forwarded and dropped LB packets used to be counted as rule_pass/policy_pass."""
    lb.set_cpu(0)
    service(lb, VIP4)
    service(lb, "10.99.0.101", fwd=abi.LB_FWD_REDIRECT, slot=1)
    service(lb, "10.99.0.102", slot=2, backends=())
    service(lb, "10.99.0.103", slot=3, steer=[0])
    forwarded = {"passed": 0, "dropped": 0, "forwarded": 1}
    dropped = {"passed": 0, "dropped": 1, "forwarded": 0}
    passed = {"passed": 1, "dropped": 0, "forwarded": 0}
    cases = [
        ("tx", frame(), ("XDP_TX", "lb_tx", forwarded)),
        ("redirect without its egress port", frame(dst="10.99.0.101"),
         ("XDP_DROP", "lb_no_egress", dropped)),
        ("no backend", frame(dst="10.99.0.102"), ("XDP_DROP", "lb_no_backend", dropped)),
        ("steered to a CPU", frame(dst="10.99.0.103"), ("XDP_REDIRECT", "lb_cpu", passed)),
        ("no service", frame(dport=22), ("XDP_PASS", "policy_pass", passed)),
    ]
    got = [(desc, outcome(fw, run, pkt), want) for desc, pkt, want in cases]
    lb.set_tx_port(TX_PORT, LO_IFINDEX)
    got.append(("redirect", outcome(fw, run, frame(dst="10.99.0.101")),
                ("XDP_REDIRECT", "lb_redirect", forwarded)))
    bad = [f"{desc}: {have}, wanted {want}" for desc, have, want in got if have != want]
    assert not bad, "\n".join(bad)


def _vips_in_one_bucket(n: int) -> list[str]:
    """n IPv4 VIPs whose lb_vip_index buckets are the same (found with abi's mirror of the
    program's hash: if the two disagreed, the services below would not be found)."""
    by_bucket: dict[int, list[str]] = collections.defaultdict(list)
    for i in range(1, 60000):
        addr = f"10.98.{i >> 8}.{i & 255}"
        bucket = abi.lb_vip_bucket(Vip(addr, PORT, "tcp").key())
        by_bucket[bucket].append(addr)
        if len(by_bucket[bucket]) == n:
            return by_bucket[bucket]
    raise AssertionError("no bucket filled")


def test_vips_are_found_alone_and_when_they_share_a_bucket(run, lb):
    """The index of VIPs (one array read, then the slot's VIP compared) and the hash map it
    falls back to when several VIPs share a bucket: every service is found, before and as
    the bucket empties again; a VIP of the bucket with no service is not."""
    shared = _vips_in_one_bucket(4)
    vips = shared[:3]
    for slot, (vip, be) in enumerate(zip(vips, (1, 2, 3), strict=True)):
        service(lb, vip, slot=slot, backends=(be,))
    bucket = abi.lb_vip_bucket(Vip(vips[0], PORT, "tcp").key())
    index = lb.vip_index.lookup(bucket.to_bytes(4, "little"))
    assert int.from_bytes(index, "little") == abi.LB_VIP_COLLIDE

    def check(live: list[str]) -> None:
        for slot, vip in enumerate(vips):
            res = run(frame(dst=vip))
            if vip in live:
                assert res.verdict == "XDP_TX" and backend_of(res.data) == slot + 1, vip
            else:
                assert res.verdict == "XDP_PASS", f"{vip} has no service: {res.verdict}"
        assert run(frame(dst=shared[3])).verdict == "XDP_PASS", "a VIP of no service"

    check(vips)
    for gone in vips[:2]:
        lb.del_service(Vip(gone, PORT, "tcp"))
        lb.vips.remove(Vip(gone, PORT, "tcp"))
        check([v for v in vips if v in [x.address for x in lb.vips]])
    index = lb.vip_index.lookup(bucket.to_bytes(4, "little"))
    assert int.from_bytes(index, "little") == 2 + 1, "one service left: its slot + 1"


def test_the_flow_cache_forgets_what_conntrack_forgets(run, lb):
    """An established flow is served from the per-CPU cache; clearing conntrack clears the
    cache too, so the flow then follows the table."""
    service(lb, VIP4, backends=(1,))
    assert backend_of(run(frame(sport=5555)).data) == 1
    lb.set_backend(2, MACS[2], EGRESS_MAC, TX_PORT, gen=102)
    write_table(lb, 0, [2])
    assert backend_of(run(frame(sport=5555), repeat=3).data) == 1, "cached flow moved"
    lb.clear_conntrack()
    assert backend_of(run(frame(sport=5555)).data) == 2, "a forgotten flow kept its backend"
