"""fw_config.skip: the program skips the source maps that are empty. A bit set over a map that
holds a rule would let that rule's packets through, so every test here checks verdicts on the
real program, not only the bits."""

from __future__ import annotations

import ipaddress
import os
import random
from array import array

import pytest

from tests import packets as P
from tests.conftest import isolated_program_config, remove_pins
from xdpfw.dataplane import abi
from xdpfw.dataplane.fw_config import SKIP_BITS
from xdpfw.rules.model import Action, parse_prefix
from xdpfw.service import Firewall, RuleSpec

pytestmark = pytest.mark.bpf

ALL = abi.SKIP_HOSTS_V4 | abi.SKIP_RULES_V4 | abi.SKIP_HOSTS_V6 | abi.SKIP_RULES_V6

# (rule prefix, the bit of the map it lands in, a packet from inside it)
ONE_PER_MAP = [
    ("198.51.100.7/32", abi.SKIP_HOSTS_V4, P.udp4("198.51.100.7", 53)),
    ("198.51.100.0/24", abi.SKIP_RULES_V4, P.udp4("198.51.100.99", 53)),
    ("2001:db8:5::7/128", abi.SKIP_HOSTS_V6, P.udp6("2001:db8:5::7", 53)),
    ("2001:db8:6::/48", abi.SKIP_RULES_V6, P.udp6("2001:db8:6::99", 53)),
]


def kernel_value(fw) -> abi.FwCfg:
    """What the program reads, not the control plane's copy."""
    table = fw.program.table("fw_config")
    return abi.FwCfg.from_buffer_copy(bytes(table[table.Key(0)]))


def drop(prefix: str) -> RuleSpec:
    return RuleSpec(parse_prefix(prefix), Action.DROP)


def test_an_empty_map_is_skipped_until_a_rule_lands_in_it(run, fw):
    assert kernel_value(fw).skip == ALL
    for prefix, bit, pkt in ONE_PER_MAP:
        assert run(pkt).verdict == "XDP_PASS"
        rule = fw.add_rules([drop(prefix)])[0]
        assert kernel_value(fw).skip == ALL & ~bit, prefix
        assert run(pkt).verdict == "XDP_DROP", prefix
        fw.delete_rule(rule.id)
        assert kernel_value(fw).skip == ALL, f"{prefix}: its map is empty again"
        assert run(pkt).verdict == "XDP_PASS", prefix


def test_random_adds_and_deletes_never_hide_a_rule(run, fw):
    """After every change: a set bit means an empty map, and every rule drops its packets."""
    rng = random.Random(7)
    pool = [p for p, _, _ in ONE_PER_MAP] + [
        "203.0.113.5/32", "203.0.113.128/25", "2001:db8:9::1/128", "2001:db8:a::/64",
    ]
    live: dict[str, int] = {}
    for step in range(40):
        absent = [p for p in pool if p not in live]
        if absent and (not live or rng.random() < 0.55):
            batch = rng.sample(absent, rng.randint(1, min(3, len(absent))))
            for rule in fw.add_rules([drop(p) for p in batch]):
                live[str(rule.prefix)] = rule.id
        else:
            victim = rng.choice(sorted(live))
            fw.delete_rule(live.pop(victim))
        skip = kernel_value(fw).skip
        for m in fw.maps.source_maps():
            bit = SKIP_BITS[m.name]
            assert not (skip & bit and m.has_keys()), f"step {step}: {m.name} skipped, not empty"
        for prefix in live:
            net = ipaddress.ip_network(prefix)
            src = str(net.network_address + (1 if net.num_addresses > 1 else 0))
            pkt = P.udp4(src, 53) if net.version == 4 else P.udp6(src, 53)
            assert run(pkt).verdict == "XDP_DROP", f"step {step}: {prefix} ({src}) not dropped"


def test_a_write_in_flight_keeps_its_map_searched(fw):
    gate = fw.maps.fw_config
    with gate.writing([fw.maps.hosts_v4]):
        # The map is still empty here; a refresh must not take that for "skip it".
        gate.refresh(fw.maps.source_maps())
        assert not kernel_value(fw).skip & abi.SKIP_HOSTS_V4
    gate.refresh(fw.maps.source_maps())
    assert kernel_value(fw).skip == ALL


def test_sample_rate_and_skip_bits_share_the_entry_without_clobbering(fw):
    gate = fw.maps.fw_config
    try:
        gate.set_sample_rate(7)
        assert (kernel_value(fw).sample_rate, kernel_value(fw).skip) == (7, ALL)
        fw.add_rules([drop("198.51.100.0/24")])
        assert (kernel_value(fw).sample_rate, kernel_value(fw).skip) == (
            7, ALL & ~abi.SKIP_RULES_V4,
        )
    finally:
        gate.set_sample_rate(0)


def test_pins_from_a_build_without_fw_config_keep_every_rule(tmp_path):
    """An upgrade from a build before fw_config: its maps are pinned, fw_config is not.
    The new entry starts at zero (search everything), then start-up sets the bits."""
    cfg = isolated_program_config()
    try:
        fw = Firewall(tmp_path, cfg)
        fw.add_rules([drop("198.51.100.7/32")])
        fw.close()
        os.unlink(os.path.join(cfg.pin_dir, "fw_config"))

        fw = Firewall(tmp_path, cfg)
        try:
            assert kernel_value(fw).skip == ALL & ~abi.SKIP_HOSTS_V4
            from xdpfw.dataplane.testrun import test_run

            assert test_run(fw.program.fd, P.udp4("198.51.100.7", 53)).verdict == "XDP_DROP"
            assert test_run(fw.program.fd, P.udp4("198.51.100.8", 53)).verdict == "XDP_PASS"
        finally:
            fw.close()
    finally:
        remove_pins(cfg.pin_dir)


# -- hostless_v4: one bit per /24 without host rules ------------------------------------------


def kernel_hostless(fw) -> tuple[set[int], array]:
    """(the /24s that hold a host in hosts_v4, the bitmap words) as the kernel has them."""
    keys, _ = fw.maps.hosts_v4.dump()
    hosts = {int.from_bytes(keys[i:i + 4], "big") for i in range(0, len(keys), 4)}
    _, words = fw.maps.fw_config.hostless_map.dump()
    return {h >> 8 for h in hosts}, array("Q", words)


def assert_hostless_sound(fw, where: str) -> None:
    """No /24 that holds a host may be marked hostless (that would skip the host's rule)."""
    with_hosts, words = kernel_hostless(fw)
    wrong = [s for s in with_hosts if words[s >> 6] >> (s & 63) & 1]
    assert not wrong, f"{where}: /24s marked hostless but holding hosts: {wrong[:5]}"


def is_hostless(words: array, addr: str) -> bool:
    s = int(ipaddress.IPv4Address(addr)) >> 8
    return bool(words[s >> 6] >> (s & 63) & 1)


def test_hosts_clear_their_24_and_the_last_delete_sets_it_again(run, fw):
    a = fw.add_rules([drop("198.51.100.7/32")])[0]
    b = fw.add_rules([drop("198.51.100.200/32")])[0]
    fw.add_rules([RuleSpec(parse_prefix("198.51.100.0/24"), Action.PASS),
                  drop("203.0.113.0/24")])
    _, words = kernel_hostless(fw)
    assert not is_hostless(words, "198.51.100.1")
    assert is_hostless(words, "203.0.113.1"), "a /24 with only a trie rule is hostless"
    assert run(P.udp4("198.51.100.7", 53)).verdict == "XDP_DROP"
    assert run(P.udp4("198.51.100.8", 53)).verdict == "XDP_PASS"  # the /24 pass rule
    assert run(P.udp4("203.0.113.9", 53)).verdict == "XDP_DROP"  # hostless: the trie decides
    fw.delete_rule(a.id)
    _, words = kernel_hostless(fw)
    assert not is_hostless(words, "198.51.100.1"), "198.51.100.200 is still there"
    assert run(P.udp4("198.51.100.200", 53)).verdict == "XDP_DROP"
    fw.delete_rule(b.id)
    _, words = kernel_hostless(fw)
    assert is_hostless(words, "198.51.100.1")
    assert run(P.udp4("198.51.100.200", 53)).verdict == "XDP_PASS"


def test_random_hosts_sharing_24s_are_never_skipped(run, fw):
    rng = random.Random(11)
    pool = [f"198.51.{c}.{d}/32" for c in (100, 101, 102) for d in rng.sample(range(1, 255), 6)]
    pool += ["198.51.0.0/16"]  # a trie rule under all of them: a skipped host would pass
    live: dict[str, int] = {}
    for step in range(60):
        absent = [p for p in pool if p not in live]
        if absent and (not live or rng.random() < 0.5):
            batch = rng.sample(absent, rng.randint(1, min(4, len(absent))))
            specs = [RuleSpec(parse_prefix(p), Action.PASS if p.endswith("/16") else Action.DROP)
                     for p in batch]
            for rule in fw.add_rules(specs):
                live[str(rule.prefix)] = rule.id
        else:
            victim = rng.choice(sorted(live))
            fw.delete_rule(live.pop(victim))
        assert_hostless_sound(fw, f"step {step}")
        for prefix in live:
            if prefix.endswith("/32"):
                src = prefix[:-3]
                assert run(P.udp4(src, 53)).verdict == "XDP_DROP", f"step {step}: {src}"


def test_a_bulk_rolled_back_rebuilds_the_bitmap(fw):
    """More deleted /24s than are probed one by one: the bitmap is rebuilt from hosts_v4."""
    from xdpfw.dataplane import fw_config
    from xdpfw.errors import ConflictError

    n = fw_config.PROBE_24S_UP_TO + 20
    hosts = [parse_prefix(f"10.{i // 250}.{i % 250}.1/32") for i in range(n)]
    keep = fw.add_rules([drop("10.200.0.1/32")])[0]
    with pytest.raises(ConflictError):
        fw.add_prefixes_streamed([hosts, [parse_prefix("10.200.0.1/32")]], Action.DROP)
    assert_hostless_sound(fw, "after the rollback")
    _, words = kernel_hostless(fw)
    assert all(is_hostless(words, str(ipaddress.IPv4Address(h.net + 5))) for h in hosts)
    assert not is_hostless(words, "10.200.0.9")
    fw.delete_rule(keep.id)


def test_start_up_rebuilds_a_bitmap_it_cannot_trust(tmp_path):
    """A bitmap that says "no hosts" over a /24 that has one (left by a crash between a
    delete's bit and its store commit, say) is corrected before anything is served."""
    from xdpfw.dataplane.testrun import test_run

    cfg = isolated_program_config()
    try:
        fw = Firewall(tmp_path, cfg)
        fw.add_rules([drop("198.51.100.7/32")])
        handle = fw.maps.fw_config.hostless_map
        s = int(ipaddress.IPv4Address("198.51.100.7")) >> 8
        handle.update((s >> 6).to_bytes(4, "little"), ((1 << 64) - 1).to_bytes(8, "little"))
        assert test_run(fw.program.fd, P.udp4("198.51.100.7", 53)).verdict == "XDP_PASS", (
            "the forged bit should make the program skip the host (the test's premise)")
        fw.close()

        fw = Firewall(tmp_path, cfg)
        try:
            assert_hostless_sound(fw, "after start-up")
            assert test_run(fw.program.fd, P.udp4("198.51.100.7", 53)).verdict == "XDP_DROP"
        finally:
            fw.close()
    finally:
        remove_pins(cfg.pin_dir)


def test_a_host_write_clears_its_bit_even_if_our_copy_says_clear(run, fw):
    """The copy of the bitmap in user space may lag the kernel (a batch cut short, a hand
    edit): clearing must not trust it, or a host would be written under a set bit."""
    fw.add_rules([drop("198.51.100.7/32")])
    s = int(ipaddress.IPv4Address("198.51.100.7")) >> 8
    word = (s >> 6).to_bytes(4, "little")
    fw.maps.fw_config.hostless_map.update(word, ((1 << 64) - 1).to_bytes(8, "little"))
    assert run(P.udp4("198.51.100.7", 53)).verdict == "XDP_PASS", "premise: the bit hides it"
    fw.add_rules([drop("198.51.100.9/32")])
    assert run(P.udp4("198.51.100.9", 53)).verdict == "XDP_DROP"
    assert run(P.udp4("198.51.100.7", 53)).verdict == "XDP_DROP"
    assert_hostless_sound(fw, "after the second host")
