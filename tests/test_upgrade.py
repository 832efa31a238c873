"""Program upgrade: a new build replaces the attached one atomically on the same pinned maps;
a build the verifier rejects leaves the old one attached and reports the verifier log."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import packets as P
from tests.test_program import add
from xdpfw import netns as nsutil
from xdpfw.dataplane.attach import link_info
from xdpfw.errors import VerifierError

pytestmark = pytest.mark.bpf

BROKEN = Path(__file__).parent / "data" / "xdpfw_oob.c"


@pytest.fixture
def guarded_veth(fw, make_netns):
    """A veth end in a test namespace, guarded (generic mode) by the session firewall."""
    a, b = make_netns("upa"), make_netns("upb")
    nsutil.veth_pair(a, "up0", b, "up1")
    fw.attach_interface("up0", a, mode="generic")
    yield ("up0", a)
    fw.detach_interface("up0", a)


def instance_id(fw, where: tuple[str, str]) -> int:
    """The id of the instance the firewall runs on that interface."""
    return fw.dp.instance_id(fw.attachments[where].record.slot)


def attached_id(where: tuple[str, str]) -> int | None:
    return link_info(*where)[2]


def test_upgrade_swaps_the_attached_program_and_keeps_maps(fw, run, guarded_veth):
    rule = add(fw, "192.0.2.0/24", "drop")
    before = fw.program_info()
    before_instance = instance_id(fw, guarded_veth)
    assert attached_id(guarded_veth) == before_instance
    assert run(P.udp4("192.0.2.9", 53)).verdict == "XDP_DROP"

    up = fw.upgrade()
    old, new = up.old, up.new

    assert (old.id, new.id) == (before.id, fw.program_info().id) and new.id != old.id
    now = instance_id(fw, guarded_veth)
    assert now != before_instance and attached_id(guarded_veth) == now, \
        f"{guarded_veth} still runs id {before_instance}"
    # Same pinned maps: the rule still drops, and its counter went on counting.
    assert run(P.udp4("192.0.2.9", 53)).verdict == "XDP_DROP"
    assert fw.rule_counter(rule)[0] == 2, fw.stats()


def test_a_build_the_verifier_rejects_leaves_the_old_program(fw, run, guarded_veth):
    add(fw, "192.0.2.0/24", "drop")
    before = fw.program_info()

    with pytest.raises(VerifierError) as err:
        fw.upgrade(BROKEN)

    log = err.value.log
    assert "invalid access to packet" in log, f"no verifier log in the error:\n{err.value}"
    assert fw.program_info() == before
    assert attached_id(guarded_veth) == instance_id(fw, guarded_veth), \
        "the rejected build changed the attachment"
    assert run(P.udp4("192.0.2.9", 53)).verdict == "XDP_DROP"


def test_drop_events_follow_the_upgrade(fw, run):
    """The Dataplane re-binds its ring-buffer readers to the new build."""
    from xdpfw.dataplane import abi
    from xdpfw.events import decode

    add(fw, "192.0.2.0/24", "drop")
    records: list[bytes] = []
    fw.dp.set_sample_rate(1)
    reader = fw.dp.read_events(records.append)
    try:
        assert run(P.udp4("192.0.2.9", 53)).verdict == "XDP_DROP"
        assert nsutil.wait_until(lambda: len(records) == 1), records
        fw.upgrade()
        assert run(P.udp4("192.0.2.10", 53)).verdict == "XDP_DROP"
        assert nsutil.wait_until(lambda: len(records) == 2), "no event from the new build"
    finally:
        fw.dp.stop_events(reader)
        fw.dp.set_sample_rate(0)
    saddrs = [decode(abi.DropEvent.from_buffer_copy(r))["saddr"] for r in records]
    assert saddrs == ["192.0.2.9", "192.0.2.10"], saddrs
