"""The Firewall calls a fleet node's sync engine makes: rules with ids given by etcd (in any
order), deleted many at a time (delete_where), a set's chunks swapped with ids given
(replace_ids), all or nothing, and found back by id, by match and by set."""

from __future__ import annotations

import numpy as np
import pytest

from tests import packets as P
from xdpfw.errors import ConflictError, NotFoundError
from xdpfw.rules.model import Action, Proto, parse_prefix
from xdpfw.rules.table import Prefixes
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


def test_delete_by_ids_is_all_or_nothing(fw, run):
    fw.add_rules([_spec("10.0.0.0/8"), _spec("11.0.0.0/8"), _spec("12.0.0.0/8")],
                 ids=[1, 2, 3])
    with pytest.raises(NotFoundError):
        fw.delete_where(ids=[1, 99])
    assert len(fw.list_rules()) == 3
    assert fw.delete_where(ids=[1, 3, 3]).removed == 2
    assert [r.id for r in fw.list_rules()] == [2]
    assert run(P.udp4("10.0.0.1", 53)).verdict == PASS
    assert run(P.udp4("11.0.0.1", 53)).verdict == DROP


def test_replace_ids_swaps_many_rules_in_one_change(fw, run):
    first = canonical_hosts(0x0A000000, 5000)  # 10.0.0.0 ...
    fw.replace_ids(np.zeros(0, np.int64), first, Action.DROP, "set a",
                   np.arange(1000, 1000 + len(first)), rule_set="a")
    assert run(P.udp4("10.0.0.7", 53)).verdict == DROP
    # Half stays (under new ids), half goes, and as many come.
    second = Prefixes.concat([first.take(slice(2500, 5000)), canonical_hosts(0x0B000000, 2500)])
    report = fw.replace_ids(np.arange(1000, 6000), second, Action.DROP, "set a",
                            np.arange(9000, 9000 + len(second)), rule_set="a")
    assert (report.added, report.removed, report.changed, report.kept) == (2500, 2500, 2500, 0)
    assert len(fw.list_rules()) == 5000 and fw.sets() == {"a": 5000}
    assert run(P.udp4("10.0.0.7", 53)).verdict == PASS
    assert run(P.udp4("10.0.19.100", 53)).verdict == DROP  # the kept half: 10.0.9.196 on
    assert run(P.udp4("11.0.0.9", 53)).verdict == DROP
    assert fw.get_rule(9000).prefix == parse_prefix("10.0.9.196")
    assert fw.get_rule(9000).rule_set == "a"
    with pytest.raises(ConflictError):  # a prefix that exists, not leaving: nothing changes
        fw.replace_ids(np.zeros(0, np.int64), second.take(slice(0, 1)), Action.DROP, "",
                       np.array([20000]))
    with pytest.raises(ConflictError, match="id 9000"):  # an id that is a rule already
        fw.replace_ids(np.array([9001]), canonical_hosts(0x0C000000, 1), Action.DROP, "",
                       np.array([9000]))
    with pytest.raises(NotFoundError):
        fw.replace_ids(np.array([1]), second.take(slice(0, 0)), Action.DROP, "",
                       np.zeros(0, np.int64))
    assert len(fw.list_rules()) == 5000 and run(P.udp4("11.0.0.9", 53)).verdict == DROP


def test_replace_ids_below_existing_ids_keeps_rows_in_id_order(fw, run):
    """A set's chunk may come with ids below rules added since (etcd handed them out
    first): found by id afterwards, and a later add gets an id above all."""
    fw.add_rules([_spec("192.0.2.0/24")], ids=[5000])
    fw.replace_ids(np.zeros(0, np.int64), canonical_hosts(0x0A000000, 3000), Action.DROP,
                   "", np.arange(10, 3010), rule_set="low")
    fw.replace_ids(np.arange(10, 1010), canonical_hosts(0x0B000000, 10), Action.PASS, "",
                   np.arange(3100, 3110), rule_set="low")
    assert fw.table.ids_ascend()
    assert fw.get_rule(3100).prefix == parse_prefix("11.0.0.0/32")
    assert fw.get_rule(5000).prefix == parse_prefix("192.0.2.0/24")
    assert fw.get_rule(3009).rule_set == "low"
    assert run(P.udp4("11.0.0.1", 53)).verdict == PASS
    assert run(P.udp4("10.0.3.231", 53)).verdict == PASS  # 10.0.0.0 + 999: went
    assert run(P.udp4("10.0.3.232", 53)).verdict == DROP  # + 1000: stayed
    assert fw.add_rules([_spec("198.51.100.0/24")])[0].id > 5000


def canonical_hosts(base: int, n: int) -> Prefixes:
    return Prefixes(np.full(n, 4, np.uint8), np.zeros(n, np.uint64),
                    np.arange(base, base + n, dtype=np.uint64), np.full(n, 32, np.uint8))


def test_swap_rules_changes_rules_in_place_in_one_change(fw, run):
    """A fleet rule's value changed under its match: the match keeps its entry and the
    verdict changes in place, in one change (a delete then an add had a gap)."""
    fw.add_rules([_spec("10.0.0.0/8"),
                  _spec("10.1.0.0/16", action=Action.PASS, proto=Proto.UDP, dport=53,
                        comment="dns")], ids=[5, 6])
    assert run(P.udp4("10.1.0.1", 53)).verdict == PASS
    report = fw.swap_rules([5, 6], [_spec("10.0.0.0/8", comment="new"),
                                    _spec("10.1.0.0/16", proto=Proto.UDP, dport=53)], [9, 10])
    assert (report.added, report.removed, report.changed, report.kept) == (0, 0, 2, 0)
    assert [r.id for r in fw.list_rules()] == [9, 10]
    assert fw.get_rule(9).comment == "new" and fw.get_rule(10).action is Action.DROP
    assert run(P.udp4("10.1.0.1", 53)).verdict == DROP
    assert run(P.udp4("10.2.0.1", 53)).verdict == DROP
    with pytest.raises(ConflictError, match="id 10"):  # an id in use: nothing changes
        fw.swap_rules([9], [_spec("10.0.0.0/8")], [10])
    with pytest.raises(NotFoundError):
        fw.swap_rules([5], [_spec("10.0.0.0/8")], [11])
    assert [r.id for r in fw.list_rules()] == [9, 10]


def test_the_sync_engine_swaps_a_rule_whose_value_changed(fw, run, tmp_path, monkeypatch):
    """etcd's value under a rule key changes (a delete and an add of one match that came in
    one batch, or a value written again): the node swaps it, it does not delete it first."""
    from tests.test_fleet_services import KEYS, MemEtcd
    from xdpfw.fleet.cache import FleetCache
    from xdpfw.fleet.etcd import KeyValue
    from xdpfw.fleet.layout import encode_rule
    from xdpfw.fleet.sync import SyncEngine

    etcd = MemEtcd()
    spec = _spec("10.0.0.0/8", proto=Proto.UDP)
    key = KEYS.rule(spec.prefix, spec.proto, spec.dport)
    etcd.kv[key] = KeyValue(key, encode_rule(5, spec), 2, 2)
    cache = FleetCache(tmp_path / "cache.db")
    try:
        engine = SyncEngine(fw, etcd, KEYS, cache)
        engine._resync()
        assert [r.id for r in fw.list_rules()] == [5]
        deletes: list = []
        monkeypatch.setattr(fw, "delete_where", lambda **kw: deletes.append(kw))
        counts = engine._apply({key: KeyValue(key, encode_rule(8, spec._replace(
            action=Action.PASS, comment="now pass")), 3, 2)})
        assert counts["changed"] == 1 and counts["added"] == counts["deleted"] == 0, counts
        assert deletes == [], "the changed rule was deleted before its new value came"
        assert [(r.id, r.action, r.comment) for r in fw.list_rules()] == [
            (8, Action.PASS, "now pass")]
        assert run(P.udp4("10.0.0.1", 53)).verdict == PASS
    finally:
        cache.close()


def test_a_hand_written_id_that_is_taken_is_refused_alone(fw, tmp_path):
    """Two values claiming one id in a batch: the first keeps it; an id of another rule
    here: refused; the rest of the batch is applied."""
    from tests.test_fleet_services import KEYS, MemEtcd
    from xdpfw.fleet.cache import FleetCache
    from xdpfw.fleet.etcd import KeyValue
    from xdpfw.fleet.layout import encode_rule
    from xdpfw.fleet.sync import SyncEngine

    def kv(spec, rule_id):
        key = KEYS.rule(spec.prefix, spec.proto, spec.dport)
        return key, KeyValue(key, encode_rule(rule_id, spec), 2, 2)

    a, b, c, d = (_spec(p) for p in ("10.0.0.0/8", "11.0.0.0/8", "12.0.0.0/8", "13.0.0.0/8"))
    cache = FleetCache(tmp_path / "cache.db")
    try:
        engine = SyncEngine(fw, MemEtcd(), KEYS, cache)
        engine._apply(dict([kv(a, 5)]))
        counts = engine._apply(dict([kv(b, 7), kv(c, 7), kv(d, 5)]))
        assert counts["added"] == 1 and counts["refused"] == 2, counts
        assert [(r.id, str(r.prefix)) for r in fw.list_rules()] == [(5, "10.0.0.0/8"),
                                                                   (7, "11.0.0.0/8")]
        refused = engine._refused  # published in the node's status as the revision advances
        assert refused[kv(c, 7)[0]] == "id 7 belongs to another rule", refused
        assert refused[kv(d, 5)[0]] == "id 5 belongs to another rule", refused
    finally:
        cache.close()
