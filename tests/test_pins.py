"""The store and the pins know each other (xdpfw/dataplane/pins.py).

- Pins claimed by another store are refused, naming both directories; adopted, they are
  made equal to this store, so no rule is enforced that the API does not list.
- Pins of another layout (an upgrade that changed a struct, other [limits]) are replaced:
  the interfaces are swapped to the new program on fresh maps filled from the store.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import pytest

from tests import packets as P
from tests.conftest import TEST_SLOT, isolated_program_config, remove_pins
from xdpfw import netns as nsutil
from xdpfw.dataplane import abi
from xdpfw.dataplane.attach import link_info
from xdpfw.dataplane.testrun import test_run
from xdpfw.errors import PinOwnerError
from xdpfw.rules.model import Action, parse_prefix
from xdpfw.service import Firewall, RuleSpec

pytestmark = pytest.mark.bpf


def drop(prefix: str) -> RuleSpec:
    return RuleSpec(parse_prefix(prefix), Action.DROP)


def verdict(fw: Firewall, src: str) -> str:
    return test_run(fw.program.fd, P.udp4(src, 53)).verdict


@pytest.fixture
def pins():
    cfg = isolated_program_config()
    yield cfg
    remove_pins(cfg.pin_dir)
    for name in os.listdir("/sys/fs/bpf"):  # pins moved aside by a failed test
        if name.startswith(os.path.basename(cfg.pin_dir) + "-replaced-"):
            remove_pins(f"/sys/fs/bpf/{name}")


def test_pins_of_another_store_are_refused_naming_both(tmp_path, pins):
    a = Firewall(tmp_path / "a", pins)
    a.add_rules([drop("192.0.2.0/24")])
    a.close()

    with pytest.raises(PinOwnerError) as err:
        Firewall(tmp_path / "b", pins)
    msg = str(err.value)
    assert str(tmp_path / "a") in msg and str(tmp_path / "b") in msg and pins.pin_dir in msg

    # Refusing changed nothing: the owner starts again on its pins.
    a = Firewall(tmp_path / "a", pins)
    assert verdict(a, "192.0.2.9") == "XDP_DROP"
    a.close()


def test_adopted_pins_enforce_only_what_the_api_lists(tmp_path, pins, caplog):
    a = Firewall(tmp_path / "a", pins)
    a.add_rules([drop("192.0.2.0/24"), drop("198.51.100.7/32"), drop("2001:db8::/32")])
    a.close()

    caplog.set_level(logging.INFO)
    b = Firewall(tmp_path / "b", pins, adopt_pins=True)
    try:
        b.add_rules([drop("203.0.113.0/24")])
        assert [str(r.prefix) for r in b.list_rules()] == ["203.0.113.0/24"]
        assert verdict(b, "192.0.2.9") == "XDP_PASS", "a rule the API does not list drops"
        assert verdict(b, "198.51.100.7") == "XDP_PASS"
        assert verdict(b, "203.0.113.9") == "XDP_DROP"
        assert sorted(map(str, b.maps.prefix_keys())) == ["203.0.113.0/24"]
        # What the other store enforced and this one does not is logged.
        assert "2 IPv4 /24s changed verdict: 192.0.2.0/24, 198.51.100.0/24" in caplog.text, \
            caplog.text
        assert "removed 1 IPv6 prefixes: 2001:db8::/32" in caplog.text, caplog.text
        assert b.maps.identity.read().state_dir == str(tmp_path / "b")
    finally:
        b.close()


def test_unclaimed_pins_with_entries_are_made_equal_to_the_store(tmp_path, pins):
    """Pins from a build before identities: nobody claimed them, so they are resynced."""
    a = Firewall(tmp_path / "a", pins)
    a.add_rules([drop("192.0.2.0/24")])
    a.maps.identity.handle.update(b"\0" * 4, bytes(abi.PinIdentity()))  # unclaimed
    a.close()

    b = Firewall(tmp_path / "b", pins)
    try:
        assert verdict(b, "192.0.2.9") == "XDP_PASS"
        assert b.maps.prefix_keys() == []
    finally:
        b.close()


@pytest.fixture
def guarded_veth(make_netns):
    a, b = make_netns("pna"), make_netns("pnb")
    nsutil.veth_pair(a, "pn0", b, "pn1")
    return "pn0", a


def test_pins_of_another_layout_are_replaced_and_the_interfaces_swapped(
    tmp_path, pins, guarded_veth
):
    fw = Firewall(tmp_path / "s", pins)
    fw.add_rules([drop("192.0.2.0/24")])
    fw.attach_interface(*guarded_veth, mode="generic")
    fw.close()  # the program stays attached, the maps pinned

    bigger = dataclasses.replace(pins, max_port_rules=pins.max_port_rules * 2)
    fw = Firewall(tmp_path / "s", bigger)
    try:
        slot = fw.attachments[guarded_veth].record.slot
        assert link_info(*guarded_veth)[2] == fw.dp.instance_id(slot), "interface not swapped"
        assert verdict(fw, "192.0.2.9") == "XDP_DROP", "the store's rule is not enforced"
        assert fw.maps.port_rules.max_entries == 3 * bigger.max_port_rules
        leftovers = [n for n in os.listdir("/sys/fs/bpf")
                     if n.startswith(os.path.basename(pins.pin_dir) + "-replaced-")]
        assert leftovers == [], "the replaced pins were not removed"
        fw.maps.set_policy(TEST_SLOT, abi.POLICY_PASS, abi.POLICY_PASS, 0)
        assert verdict(fw, "192.0.2.9") == "XDP_DROP"
    finally:
        fw.detach_all()
        fw.close()
