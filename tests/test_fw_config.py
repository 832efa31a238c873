"""fw_config.skip: the program skips the source maps that are empty. A bit set over a map that
holds a rule would let that rule's packets through, so every test here checks verdicts on the
real program, not only the bits."""

from __future__ import annotations

import ipaddress
import os
import random

import pytest

from tests import packets as P
from tests.conftest import isolated_program_config, remove_pins
from xdpfw.dataplane import abi
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
            bit = {"hosts_v4": abi.SKIP_HOSTS_V4, "rules_v4": abi.SKIP_RULES_V4,
                   "hosts_v6": abi.SKIP_HOSTS_V6, "rules_v6": abi.SKIP_RULES_V6}[m.name]
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
