"""Rules survive a control-plane restart: the store is the truth, the pinned maps follow it."""

from __future__ import annotations

import pytest

from tests import packets as P
from tests.conftest import isolated_program_config, remove_pins
from xdpfw.dataplane.testrun import test_run
from xdpfw.rules.compile import Changes
from xdpfw.rules.model import Action, Proto, parse_prefix
from xdpfw.service import Firewall, RuleSpec

pytestmark = pytest.mark.bpf


@pytest.fixture
def pinned(tmp_path):
    cfg = isolated_program_config()
    yield tmp_path, cfg
    remove_pins(cfg.pin_dir)


def test_restart_restores_rules_and_maps_and_drops_stale_entries(pinned):
    state, cfg = pinned
    fw = Firewall(state, cfg)
    fw.add_rules([
        RuleSpec(parse_prefix("10.0.0.0/8"), Action.DROP),
        RuleSpec(parse_prefix("10.1.0.0/16"), Action.PASS, Proto.TCP, 443, "partners"),
        RuleSpec(parse_prefix("2001:db8::/32"), Action.DROP, Proto.UDP),
    ])
    before_rules = sorted(map(str, fw.list_rules()))
    before_keys = sorted(fw.maps.prefix_keys())
    before_ports = len(fw.maps.port_keys())
    # A crash between a map write and the commit: entries no rule explains.
    fw.maps.apply(Changes(prefixes={parse_prefix("192.0.2.0/24"): (7, 2, 0),
                                    parse_prefix("2001:db8:bad::/48"): (8, 2, 0)}),
                  fw._parent_of)
    fw.close()

    fw2 = Firewall(state, cfg)
    try:
        assert sorted(map(str, fw2.list_rules())) == before_rules
        assert sorted(fw2.maps.prefix_keys()) == before_keys, "stale entry not removed"
        assert fw2.maps.v4_verdict(0xC0000209) == 0, "the stale IPv4 entry still decides"
        # Every start lays port sets out anew (in the other half of their ids).
        assert len(fw2.maps.port_keys()) == before_ports
        fd = fw2.program.fd
        assert test_run(fd, P.tcp4("10.1.2.3", 443)).verdict == "XDP_PASS"
        assert test_run(fd, P.tcp4("10.1.2.3", 80)).verdict == "XDP_DROP"
        assert test_run(fd, P.udp6("2001:db8::1", 53)).verdict == "XDP_DROP"
        assert test_run(fd, P.tcp4("192.0.2.9", 80)).verdict == "XDP_PASS"
        # New ids continue after the old ones; slots are not handed out twice.
        new = fw2.add_rules([RuleSpec(parse_prefix("11.0.0.0/8"), Action.DROP)])[0]
        assert new.id > max(r.id for r in fw2.list_rules() if r != new)
        assert len({r.slot for r in fw2.list_rules()}) == len(fw2.list_rules())
    finally:
        fw2.close()


def test_old_program_keeps_filtering_with_maps_written_by_a_new_control_plane(pinned):
    """Maps are shared by pin: a rule added by a second instance is seen by the first program."""
    state, cfg = pinned
    old = Firewall(state, cfg)
    old_fd = old.program.fd
    new = Firewall(state, cfg)
    try:
        new.add_rules([RuleSpec(parse_prefix("198.51.100.0/24"), Action.DROP)])
        assert test_run(old_fd, P.udp4("198.51.100.1", 9)).verdict == "XDP_DROP"
    finally:
        new.close()
        old.close()


def test_fresh_pins_get_every_rule_back(pinned):
    """After a reboot bpffs is empty: the store alone brings the rules back into new maps."""
    state, cfg = pinned
    fw = Firewall(state, cfg)
    fw.add_rules([RuleSpec(parse_prefix("10.0.0.0/8"), Action.DROP),
                  RuleSpec(parse_prefix("10.1.0.0/16"), Action.PASS, Proto.TCP, 22)])
    keys, ports = sorted(fw.maps.prefix_keys()), len(fw.maps.port_keys())
    fw.close()
    remove_pins(cfg.pin_dir)
    fw2 = Firewall(state, cfg)
    try:
        assert sorted(fw2.maps.prefix_keys()) == keys
        assert len(fw2.maps.port_keys()) == ports
        assert test_run(fw2.program.fd, P.tcp4("10.1.0.1", 22)).verdict == "XDP_PASS"
        assert test_run(fw2.program.fd, P.tcp4("10.1.0.1", 23)).verdict == "XDP_DROP"
    finally:
        fw2.close()
