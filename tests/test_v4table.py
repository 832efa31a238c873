"""The IPv4 DIR-24-8 layout (xdpfw/dataplane/v4table.py) in the kernel's maps.

- Random rule sets, adds and deletes: every address's verdict, read from the maps the way
  the program reads them, is the longest-prefix verdict of the compiled index.
- A /24 goes PLAIN -> ONE -> GROUP -> ONE -> PLAIN as hosts and longer prefixes come and go.
- Every start rebuilds the layout in the other half of the ids and switches to it.
- Packets running while a /8 (and a /24 inside it) are added and removed, and a prefix's
  port set changes in place, each meet either the old or the new verdict of their address.
"""

from __future__ import annotations

import random
import threading
import time

import pytest

from tests import packets as P
from tests.conftest import isolated_program_config, remove_pins
from tests.test_program import add, set_policy
from xdpfw.dataplane import abi
from xdpfw.dataplane.testrun import test_run
from xdpfw.dataplane.v4table import pack_verdict
from xdpfw.rules.model import V4, Action, Prefix
from xdpfw.service import Firewall, RuleSpec

pytestmark = pytest.mark.bpf


def expected(fw, addr: int) -> int:
    """The compiled index's verdict for addr: the longest prefix with an entry."""
    best = None
    for p, v in fw.index.prefix_values.items():
        inside = p.family == V4 and p.contains(Prefix(V4, addr, 32))
        if inside and (best is None or p.length > best[0].length):
            best = (p, v)
    return pack_verdict(*best[1]) if best else 0


def probe_addresses(fw, rng: random.Random, n: int = 120) -> list[int]:
    """Addresses at and around every prefix's edges, and some anywhere."""
    out = [rng.getrandbits(32) for _ in range(n // 3)]
    for p in list(fw.index.prefix_values):
        if p.family == V4:
            size = 1 << (32 - p.length)
            out += [p.net, p.net + size - 1, (p.net - 1) % (1 << 32), (p.net + size) % (1 << 32),
                    p.net + rng.randrange(size)]
    return out


def check_layout(fw, rng, where: str) -> None:
    bad = [(a, fw.maps.v4_verdict(a), expected(fw, a)) for a in probe_addresses(fw, rng)]
    bad = [b for b in bad if b[1] != b[2]]
    assert not bad, f"{where}: {len(bad)} addresses differ, first {bad[:3]}"


def random_prefix(rng: random.Random) -> Prefix:
    plen = rng.choice([0, 4, 8, 12, 16, 18, 20, 22, 23, 24, 24, 25, 26, 28, 30, 31, 32, 32, 32])
    base = (10 << 24) | (rng.getrandbits(12) << 8) | rng.getrandbits(8)  # 10.0-15.x.x
    if plen < 8:
        base = rng.getrandbits(32)
    mask = ((1 << plen) - 1) << (32 - plen) if plen else 0
    return Prefix(V4, base & mask, plen)


@pytest.mark.parametrize("seed", range(4))
def test_random_changes_keep_every_address_at_its_longest_prefix(fw, seed):
    rng = random.Random(seed)
    live: dict[Prefix, int] = {}
    for step in range(40):
        if live and rng.random() < 0.35:
            victims = rng.sample(list(live), k=min(len(live), rng.randint(1, 4)))
            for p in victims:
                fw.delete_rule(live.pop(p))
        else:
            fresh = {random_prefix(rng) for _ in range(rng.randint(1, 12))} - set(live)
            specs = [RuleSpec(p, rng.choice([Action.DROP, Action.PASS])) for p in fresh]
            for r in fw.add_rules(specs):
                live[r.prefix] = r.id
        check_layout(fw, rng, f"seed {seed} step {step}")


def entry_kind(fw, addr: str) -> int:
    a = int.from_bytes(bytes(map(int, addr.split("."))), "big")
    raw = fw.maps.v4_tbl24.lookup((a >> 8).to_bytes(4, "little"))
    return int.from_bytes(raw, "little") >> abi.V4_KIND_SHIFT


def test_a_slash24_moves_between_plain_one_and_group(fw, run):
    add(fw, "192.0.2.0/24", "drop")
    assert entry_kind(fw, "192.0.2.0") == abi.V4_PLAIN
    host = add(fw, "192.0.2.7/32", "pass")
    assert entry_kind(fw, "192.0.2.0") == abi.V4_ONE
    second = add(fw, "192.0.2.64/26", "pass")
    assert entry_kind(fw, "192.0.2.0") == abi.V4_GROUP
    check = [("192.0.2.7", "XDP_PASS"), ("192.0.2.70", "XDP_PASS"), ("192.0.2.8", "XDP_DROP")]
    for src, want in check:
        assert run(P.udp4(src, 53)).verdict == want, src
    fw.delete_rule(second.id)
    assert entry_kind(fw, "192.0.2.0") == abi.V4_ONE
    assert run(P.udp4("192.0.2.70", 53)).verdict == "XDP_DROP"
    fw.delete_rule(host.id)
    assert entry_kind(fw, "192.0.2.0") == abi.V4_PLAIN
    assert run(P.udp4("192.0.2.7", 53)).verdict == "XDP_DROP"


def test_every_start_rebuilds_in_the_other_half(tmp_path):
    cfg = isolated_program_config()
    rng = random.Random(7)
    try:
        fw = Firewall(tmp_path / "s", cfg)
        specs = [RuleSpec(p, Action.DROP) for p in {random_prefix(rng) for _ in range(300)}]
        fw.add_rules(specs)
        gen = fw.maps.identity.read().generation
        check_layout(fw, rng, "before the restart")
        fw.close()
        fw = Firewall(tmp_path / "s", cfg)
        assert fw.maps.identity.read().generation == 1 - gen
        check_layout(fw, rng, "after the restart")
        lo = 1 + fw.maps.v4.generation * fw.maps.v4.half_ids
        assert all(lo <= v < lo + fw.maps.v4.half_ids for v in fw.maps.v4.vid.items()[1].tolist())
        fw.close()
    finally:
        remove_pins(cfg.pin_dir)


def test_packets_meet_the_old_or_the_new_verdict_while_a_slash8_comes_and_goes(fw):
    """Two sources, policy drop: 10.1.5.5 is inside a /16 drop that never changes, whatever
    the /8 above it and a /24 beside it do (so it must always drop); 10.9.9.9 is only under
    the /8 pass (so it passes with it and meets the drop policy without it)."""
    set_policy(fw, policy=abi.POLICY_DROP)
    add(fw, "10.1.0.0/16", "drop")
    stable, toggled = P.udp4("10.1.5.5", 53), P.udp4("10.9.9.9", 53)
    stop = threading.Event()
    wrong: list[str] = []
    seen: dict[str, set[str]] = {"stable": set(), "toggled": set()}

    def packets() -> None:
        while not stop.is_set():
            v = test_run(fw.program.fd, stable).verdict
            seen["stable"].add(v)
            if v != "XDP_DROP":
                wrong.append(f"10.1.5.5 got {v}")
            seen["toggled"].add(test_run(fw.program.fd, toggled).verdict)

    runner = threading.Thread(target=packets)
    runner.start()
    try:
        deadline, rounds = time.monotonic() + 2.0, 0
        while time.monotonic() < deadline:
            eight = add(fw, "10.0.0.0/8", "pass")
            beside = add(fw, "10.2.3.0/24", "pass")
            port = add(fw, "10.1.0.0/16", "pass", "tcp", 80)  # the /16's port set changes
            fw.delete_rule(port.id)
            fw.delete_rule(beside.id)
            fw.delete_rule(eight.id)
            rounds += 1
    finally:
        stop.set()
        runner.join()
    assert not wrong, f"{len(wrong)} wrong verdicts in {rounds} rounds: {wrong[:3]}"
    assert seen["toggled"] == {"XDP_DROP", "XDP_PASS"}, f"toggling never showed: {seen}"
    assert rounds > 3
