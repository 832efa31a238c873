"""The Firewall calls a fleet node's sync engine makes: rules with ids given by etcd (in any
order), deleted many at a time, all or nothing, and found back by id and by match."""

from __future__ import annotations

import pytest

from tests import packets as P
from xdpfw.errors import ConflictError, NotFoundError
from xdpfw.rules.model import Action, Proto, parse_prefix
from xdpfw.service import RuleSpec

pytestmark = pytest.mark.bpf
PASS, DROP = "XDP_PASS", "XDP_DROP"


def _spec(prefix: str, **kw) -> RuleSpec:
    return RuleSpec(parse_prefix(prefix), kw.pop("action", Action.DROP), **kw)


def test_given_ids_in_any_order_are_found_by_id(fw, run):
    fw.add_rules([_spec("10.0.0.0/8"), _spec("10.1.0.0/16", action=Action.PASS)], ids=[50, 60])
    fw.add_rules([_spec("192.0.2.1", proto=Proto.UDP, dport=53)], ids=[7])  # below the others
    assert fw.table.ids_ascend()
    assert [r.id for r in fw.list_rules()] == [7, 50, 60]
    assert fw.get_rule(60).prefix == parse_prefix("10.1.0.0/16")
    assert fw.find_rule(parse_prefix("192.0.2.1/32"), Proto.UDP, 53).id == 7
    assert run(P.udp4("10.2.0.1", 53)).verdict == DROP
    assert run(P.udp4("10.1.0.1", 53)).verdict == PASS
    # A rule added after gets an id above every given one.
    assert fw.add_rules([_spec("198.51.100.0/24")])[0].id > 60


def test_a_given_id_in_use_or_out_of_order_changes_nothing(fw):
    fw.add_rules([_spec("10.0.0.0/8")], ids=[5])
    with pytest.raises(ConflictError, match="id 5"):
        fw.add_rules([_spec("11.0.0.0/8")], ids=[5])
    with pytest.raises(ValueError, match="ascending"):
        fw.add_rules([_spec("11.0.0.0/8"), _spec("12.0.0.0/8")], ids=[9, 8])
    assert [r.id for r in fw.list_rules()] == [5]


def test_delete_rules_is_all_or_nothing(fw, run):
    fw.add_rules([_spec("10.0.0.0/8"), _spec("11.0.0.0/8"), _spec("12.0.0.0/8")],
                 ids=[1, 2, 3])
    with pytest.raises(NotFoundError):
        fw.delete_rules([1, 99])
    assert len(fw.list_rules()) == 3
    assert fw.delete_rules([1, 3, 3]) == 2
    assert [r.id for r in fw.list_rules()] == [2]
    assert run(P.udp4("10.0.0.1", 53)).verdict == PASS
    assert run(P.udp4("11.0.0.1", 53)).verdict == DROP
