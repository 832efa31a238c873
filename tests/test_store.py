"""The SQLite store: rows and batches round-trip, deletes stick, ids never go back."""

from __future__ import annotations

from xdpfw.rules.model import V4, V6, Action, Prefix, Proto, Rule
from xdpfw.rules.store import BATCH_MIN, Store


def make_rules(first_id: int, n: int, **kw) -> list[Rule]:
    out = []
    for i in range(n):
        if i % 3 == 0:
            prefix = Prefix(V6, (0x20010DB8 << 96) | (i << 64), 64)
        else:
            prefix = Prefix(V4, (10 << 24) | (i << 8), 24)
        out.append(Rule(first_id + i, prefix, kw.get("action", Action.DROP), kw.get("proto"),
                        kw.get("dport"), kw.get("comment", ""), slot=first_id + i))
    return out


def test_rows_and_batches_round_trip_with_deletes(tmp_path):
    store = Store(tmp_path / "db")
    small = make_rules(1, 5, action=Action.PASS, proto=Proto.TCP, dport=443, comment="few")
    bulk = make_rules(100, BATCH_MIN + 10, comment="feed")
    mixed = make_rules(5000, BATCH_MIN, proto=Proto.UDP) + make_rules(9000, BATCH_MIN)
    with store.transaction():
        store.insert_rules(small)
    with store.transaction():
        store.insert_rules(bulk)
    with store.transaction():
        store.insert_rules(mixed)
    gone = {small[2].id, bulk[0].id, bulk[-1].id, mixed[7].id}
    with store.transaction():
        store.delete_rules(sorted(gone))
    store.close()

    again = Store(tmp_path / "db")
    want = sorted((r for r in small + bulk + mixed if r.id not in gone), key=lambda r: r.id)
    got = again.load_rules()
    assert got == want, f"{len(got)} rules back, {len(want)} expected"
    assert again.last_rule_id() == 9000 + BATCH_MIN - 1


def test_a_rolled_back_bulk_leaves_nothing(tmp_path):
    store = Store(tmp_path / "db")
    try:
        with store.transaction():
            store.insert_rules(make_rules(1, BATCH_MIN))
            raise RuntimeError("map write failed")
    except RuntimeError:
        pass
    assert store.load_rules() == []
    assert store.last_rule_id() == 0
