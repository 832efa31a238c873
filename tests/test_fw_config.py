"""fw_config.skip: the program skips the IPv6 source maps that are empty; hostless_v6: it
skips the IPv6 host hash for sources whose /64 bucket holds no /128 rule. A bit set over a
rule would let that rule's packets through, so every test here checks verdicts on the real
program, not only the bits."""

from __future__ import annotations

import ipaddress
import os
import random
import time

import numpy as np
import pytest

from tests import packets as P
from tests.conftest import isolated_program_config, remove_pins
from xdpfw.dataplane import abi
from xdpfw.dataplane.fw_config import REBUILD_AFTER_S, SKIP_BITS, v6_buckets
from xdpfw.dataplane.testrun import test_run
from xdpfw.rules.model import Action, parse_prefix
from xdpfw.service import Firewall, RuleSpec

pytestmark = pytest.mark.bpf

ALL = abi.SKIP_HOSTS_V6 | abi.SKIP_RULES_V6

# (rule prefix, the bit of the map it lands in, a packet from inside it)
ONE_PER_MAP = [
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


# -- hostless_v6: one bit per bucket of /64s ------------------------------------------------


def hostless_words(fw) -> np.ndarray:
    return np.frombuffer(fw.maps.fw_config._hostless.dump()[1], dtype=np.uint64)


def is_hostless(words: np.ndarray, addr: str) -> bool:
    b = int(v6_buckets(ipaddress.IPv6Address(addr).packed)[0])
    return bool((int(words[b >> 6]) >> (b & 63)) & 1)


def assert_hostless_sound(fw, where: str) -> None:
    """No bucket that holds a host may be marked hostless (that would skip its rule)."""
    words = hostless_words(fw)
    buckets = v6_buckets(fw.maps.hosts_v6.dump()[0])
    wrong = [int(b) for b in buckets if (int(words[int(b) >> 6]) >> (int(b) & 63)) & 1]
    assert not wrong, f"{where}: buckets marked hostless but holding hosts: {wrong[:5]}"


def test_random_adds_and_deletes_never_hide_a_rule(run, fw):
    """After every change: a set bit means an empty map or a bucket without hosts, and every
    rule drops its packets."""
    rng = random.Random(7)
    pool = [p for p, _, _ in ONE_PER_MAP] + [
        "2001:db8:9::1/128", "2001:db8:9::2/128", "2001:db8:a::/64", "2001:db8:b::5/128",
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
            assert not (skip & SKIP_BITS[m.name] and m.has_keys()), \
                f"step {step}: {m.name} skipped, not empty"
        assert_hostless_sound(fw, f"step {step}")
        for prefix in live:
            net = ipaddress.ip_network(prefix)
            src = str(net.network_address + (1 if net.num_addresses > 1 else 0))
            assert run(P.udp6(src, 53)).verdict == "XDP_DROP", f"step {step}: {prefix}"


def test_a_write_in_flight_keeps_its_map_searched(fw):
    gate = fw.maps.fw_config
    with gate.writing([fw.maps.hosts_v6]):
        # The map is still empty here; a refresh must not take that for "skip it".
        gate.refresh(fw.maps.source_maps())
        assert not kernel_value(fw).skip & abi.SKIP_HOSTS_V6
    gate.refresh(fw.maps.source_maps())
    assert kernel_value(fw).skip == ALL


def test_a_deleted_host_s_bucket_becomes_hostless_again(run, fw):
    near = "2001:db8:77::9"  # same /64, no rule: the bit decides whether the hash is searched
    host = fw.add_rules([drop("2001:db8:77::7/128"), drop("2001:db8::/32")])
    assert not is_hostless(hostless_words(fw), near)
    assert run(P.udp6("2001:db8:77::7", 53)).verdict == "XDP_DROP"
    fw.delete_rule(host[0].id)
    deadline = time.monotonic() + REBUILD_AFTER_S + 3
    while not is_hostless(hostless_words(fw), near) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert is_hostless(hostless_words(fw), near), "the bitmap was not rebuilt after the delete"
    assert run(P.udp6("2001:db8:77::7", 53)).verdict == "XDP_DROP", "the /32 still decides"


def test_the_program_buckets_a_source_as_the_control_plane_does(run, fw):
    """Every bit set but the one Python computes for a host: if the program bucketed the
    source differently, it would skip the host hash and miss the host's pass rule."""
    fw.add_rules([drop("2001:db8:40::/48"), RuleSpec(parse_prefix("2001:db8:40::5/128"),
                                                      Action.PASS)])
    words = np.full(abi.HOSTLESS_V6_WORDS, (1 << 64) - 1, dtype=np.uint64)
    b = int(v6_buckets(ipaddress.IPv6Address("2001:db8:40::5").packed)[0])
    words[b >> 6] &= ~np.uint64(1 << (b & 63))
    handle = fw.maps.fw_config._hostless
    handle.update_many(np.arange(len(words), dtype=np.uint32).tobytes(), words.tobytes(),
                       len(words))
    try:
        assert run(P.udp6("2001:db8:40::5", 53)).verdict == "XDP_PASS"
        assert run(P.udp6("2001:db8:40::6", 53)).verdict == "XDP_DROP"
    finally:
        fw.maps.fw_config.resync(fw.maps.source_maps())


def test_sample_rate_and_skip_bits_share_the_entry_without_clobbering(fw):
    gate = fw.maps.fw_config
    try:
        gate.set_sample_rate(7)
        assert (kernel_value(fw).sample_rate, kernel_value(fw).skip) == (7, ALL)
        fw.add_rules([drop("2001:db8:6::/48")])
        assert (kernel_value(fw).sample_rate, kernel_value(fw).skip) == (
            7, ALL & ~abi.SKIP_RULES_V6)
    finally:
        gate.set_sample_rate(0)


def test_a_forged_bit_at_start_up_is_not_trusted(tmp_path):
    """Start-up rebuilds the bitmap from hosts_v6 itself, whatever the pinned words say."""
    cfg = isolated_program_config()
    try:
        fw = Firewall(tmp_path, cfg)
        fw.add_rules([drop("2001:db8:50::7/128")])
        fw.close()
        os.unlink(os.path.join(cfg.pin_dir, "fw_config"))  # as a build before fw_config
        fw = Firewall(tmp_path, cfg)
        handle = fw.maps.fw_config._hostless
        ones = np.full(abi.HOSTLESS_V6_WORDS, (1 << 64) - 1, dtype=np.uint64)
        handle.update_many(np.arange(len(ones), dtype=np.uint32).tobytes(), ones.tobytes(),
                           len(ones))
        fw.close()
        fw = Firewall(tmp_path, cfg)
        try:
            assert_hostless_sound(fw, "after start-up")
            fw.maps.set_policy(0, abi.POLICY_PASS, abi.POLICY_PASS, 0)
            pkt = P.udp6("2001:db8:50::7", 53)
            assert test_run(fw.program.fd, pkt).verdict == "XDP_DROP"
        finally:
            fw.close()
    finally:
        remove_pins(cfg.pin_dir)
