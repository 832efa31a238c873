"""Named sets, replaced as a whole (Firewall.replace_set, PUT /api/v1/sets/{name}), against
an independent model: set arithmetic over generated inputs for the rules, and
tests/packet_model.py (longest prefix, then most specific) for what the program decides.

Each step replaces one set by a random mix of its own rules (kept, or changed), new ones,
and now and then a rule of the other set (a conflict: nothing may change). After each step
the table, the store read back from disk, and the verdicts the real program gives probe
packets must all equal the model. Both ways a replace is written are covered: from columns
(plain rules, no port rule anywhere) and compiled (a port rule elsewhere).
"""

from __future__ import annotations

import random
import threading

import pytest

from tests import packets as P
from tests.packet_model import Model
from tests.packet_model import Rule as ModelRule
from tests.test_api import snapshot
from xdpfw.dataplane.testrun import test_run
from xdpfw.errors import ConflictError, MapFullError, NotFoundError
from xdpfw.rules.document import RuleDocument, Section
from xdpfw.rules.kind import RuleKind
from xdpfw.rules.model import V4, Action, Proto, parse_prefix
from xdpfw.rules.store import Store
from xdpfw.rules.table import Prefixes
from xdpfw.service import RuleSpec

pytestmark = pytest.mark.bpf

V4_LENGTHS = (8, 12, 16, 20, 22, 24, 24, 25, 28, 30, 32, 32, 32)
V6_LENGTHS = (32, 48, 56, 64, 64, 96, 128, 128)
Key = tuple[str, str | None, int | None]  # prefix, proto, dport: a rule's identity
Kind = tuple[str, str, str]  # action, comment, set


def random_prefix(rng: random.Random) -> str:
    """Prefixes in a small space, so that they nest and collide often."""
    if rng.random() < 0.2:
        plen = rng.choice(V6_LENGTHS)
        net = (0x20010DB8 << 96) | (rng.getrandbits(16) << 80) | rng.getrandbits(80)
        net &= ((1 << plen) - 1) << (128 - plen)
        return str(parse_prefix(f"{_v6(net)}/{plen}"))
    plen = rng.choice(V4_LENGTHS)
    net = (10 << 24) | (rng.getrandbits(6) << 18) | rng.getrandbits(18)
    net &= ((1 << plen) - 1) << (32 - plen)
    return f"{net >> 24}.{(net >> 16) & 255}.{(net >> 8) & 255}.{net & 255}/{plen}"


def _v6(net: int) -> str:
    import ipaddress

    return str(ipaddress.IPv6Address(net))


def document(rules: dict[Key, Kind]) -> RuleDocument:
    """Rules as sections, one per (match, kind), as a request would bring them."""
    sections: dict[tuple, list[str]] = {}
    for (prefix, proto, dport), (action, comment, rule_set) in rules.items():
        sections.setdefault((action, proto, dport, comment, rule_set), []).append(prefix)
    return RuleDocument([
        Section(Prefixes.of([parse_prefix(p) for p in prefixes]),
                RuleKind(action=a, proto=proto, dport=dport, comment=c, set=s))
        for (a, proto, dport, c, s), prefixes in sections.items()])


def table_state(fw) -> dict[Key, Kind]:
    return {(str(r.prefix), r.proto.value if r.proto else None, r.dport):
            (r.action.value, r.comment, r.rule_set) for r in fw.list_rules()}


def probes(prefixes: set[str], rng: random.Random, n: int = 200) -> list[str]:
    """Source addresses at the edges of every prefix, inside them, and anywhere."""
    import ipaddress

    out = set()
    for prefix in prefixes:
        net = ipaddress.ip_network(prefix)
        size = net.num_addresses
        base = int(net.network_address)
        for off in (0, size - 1, rng.randrange(size), -1, size):
            addr = base + off
            if 0 <= addr < (1 << net.max_prefixlen):
                out.add(str(ipaddress.ip_address(addr) if net.version == 4
                            else ipaddress.IPv6Address(addr)))
    ordered = sorted(out)
    rng.shuffle(ordered)
    return ordered[:n] + [f"10.{rng.randrange(64)}.{rng.randrange(256)}.{rng.randrange(256)}"
                          for _ in range(20)]


def check(fw, want: dict[Key, Kind], rng: random.Random, where: str,
          gone: set[Key] = frozenset()) -> None:
    """The table, the store and the program equal the model; `gone`: rules just removed,
    whose prefixes are probed too."""
    got = table_state(fw)
    assert got == want, f"{where}: the table differs from the model: " \
        f"missing {sorted(set(want) - set(got))[:5]}, extra {sorted(set(got) - set(want))[:5]}"
    on_disk = {(str(r.prefix), r.proto.value if r.proto else None, r.dport):
               (r.action.value, r.comment, r.rule_set) for r in Store(fw.store.path).load_rules()}
    assert on_disk == want, f"{where}: the store differs from the model"
    model = Model([ModelRule(p, a, proto, dport) for (p, proto, dport), (a, _, _) in want.items()])
    bad = []
    for src in probes({k[0] for k in want} | {k[0] for k in gone}, rng):
        v6 = ":" in src
        for frame in ((P.tcp6(src, 22) if v6 else P.tcp4(src, 22)),
                      (P.udp6(src, 53) if v6 else P.udp4(src, 53)),
                      (P.icmp6(src) if v6 else P.icmp4(src))):
            expected = model.verdict(frame)[0]
            got_v = test_run(fw.program.fd, frame).verdict
            if got_v != expected:
                bad.append((src, frame[23 if not v6 else 20], got_v, expected))
    assert not bad, f"{where}: {len(bad)} probes differ from the model, first {bad[:4]}"


def next_body(rng: random.Random, state: dict[Key, Kind], name: str,
              other_sets: set[Key], ports: bool) -> dict[Key, Kind]:
    """A new list for set `name`: some of its rules kept, some changed, new ones (with a
    protocol and port now and then, if `ports`)."""
    mine = {k: v for k, v in state.items() if v[2] == name}
    body: dict[Key, Kind] = {}
    for k, (action, comment, _) in mine.items():
        r = rng.random()
        if r < 0.45:
            body[k] = (action, comment, name)  # kept
        elif r < 0.65:
            flip = "pass" if action == "drop" else "drop"
            body[k] = (flip, comment, name) if rng.random() < 0.5 else (
                action, f"c{rng.randrange(3)}", name)  # changed
    for _ in range(rng.randint(0, 25)):
        proto, dport = None, None
        if ports and rng.random() < 0.15:
            proto = rng.choice(["tcp", "udp"])
            dport = rng.choice([None, 22, 53])
        k = (random_prefix(rng), proto, dport)
        if k not in other_sets:
            body[k] = (rng.choice(["drop", "drop", "pass"]), "", name)
    return body


@pytest.mark.parametrize("compiled", [False, True], ids=["columns", "compiled"])
@pytest.mark.parametrize("seed", range(3))
def test_replace_against_set_arithmetic_and_the_packet_model(fw, seed, compiled):
    rng = random.Random(seed * 7 + compiled)
    state: dict[Key, Kind] = {}
    if compiled:  # a port rule outside any set: every change goes through the compiler
        fw.add_rules([RuleSpec(parse_prefix("172.16.0.0/12"), Action.DROP, Proto.TCP, 22)])
        state[("172.16.0.0/12", "tcp", 22)] = ("drop", "", "")
    for step in range(14):
        assert fw.index.plain_only() != compiled, "the test lost the path it is about"
        name = rng.choice(["a", "b"])
        others = {k for k, v in state.items() if v[2] != name}
        body = next_body(rng, state, name, others, ports=compiled)
        if others and rng.random() < 0.2:  # someone else's rule: refused, nothing changes
            stolen = rng.choice(sorted(others, key=str))
            before = snapshot(fw)
            with pytest.raises(ConflictError, match="cannot take it over"):
                fw.replace_set(name, document({**body, stolen: ("drop", "", name)}))
            assert snapshot(fw) == before, f"step {step}: a refused replace changed something"
            continue
        if not body:
            continue
        ids_before = {(str(r.prefix), r.proto.value if r.proto else None, r.dport): r.id
                      for r in fw.list_rules()}
        report = fw.replace_set(name, document(body))
        mine_before = {k: v for k, v in state.items() if v[2] == name}
        assert report.added == len(set(body) - set(mine_before)), step
        assert report.removed == len(set(mine_before) - set(body)), step
        assert report.kept + report.changed == len(set(body) & set(mine_before)), step
        assert report.changed == sum(body[k] != mine_before[k] for k in body
                                     if k in mine_before), step
        state = {k: v for k, v in state.items() if v[2] != name} | body
        check(fw, state, rng, f"seed {seed} step {step} (set {name})",
              gone=set(mine_before) - set(body))
        ids_after = {(str(r.prefix), r.proto.value if r.proto else None, r.dport): r.id
                     for r in fw.list_rules()}
        for k in body:
            if k in mine_before and body[k] == mine_before[k]:
                assert ids_after[k] == ids_before[k], f"kept rule {k} changed its id"


def test_a_set_replaced_again_is_not_a_conflict_and_keeps_its_rules(fw):
    """What was seen: re-importing a feed answered 409. Replacing the set with the same
    list changes nothing (same ids); a refreshed list changes only the difference."""
    feed = {(f"198.51.100.{i}/32", None, None): ("drop", "feed", "spamhaus") for i in range(50)}
    first = fw.replace_set("spamhaus", document(feed))
    assert (first.added, first.removed, first.kept) == (50, 0, 0)
    ids = {r.prefix: r.id for r in fw.list_rules()}
    again = fw.replace_set("spamhaus", document(feed))
    assert (again.added, again.removed, again.kept, again.changed) == (0, 0, 50, 0)
    assert {r.prefix: r.id for r in fw.list_rules()} == ids
    fresh = {k: v for k, v in feed.items() if not k[0].startswith("198.51.100.1")}
    fresh[("203.0.113.0/24", None, None)] = ("drop", "feed", "spamhaus")
    report = fw.replace_set("spamhaus", document(fresh))
    assert (report.added, report.removed, report.kept) == (1, 11, 39)
    assert fw.sets() == {"spamhaus": 40}


def test_a_bulk_delete_after_a_port_rule_went_leaves_nothing(fw, run):
    """A /16 with a port rule that came and went, then deleted with delete_where (the plain
    path, from columns): nothing of it stays in the index or the maps (its compiled value
    once stayed behind, and the next change of the layout tripped over it)."""
    drop = fw.add_rules([RuleSpec(parse_prefix("10.1.0.0/16"), Action.DROP)])[0]
    port = fw.add_rules([RuleSpec(parse_prefix("10.1.0.0/16"), Action.PASS, Proto.TCP, 80)])[0]
    fw.delete_rule(port.id)
    assert fw.index.plain_only()
    assert fw.delete_where(ids=[drop.id]).removed == 1
    assert snapshot(fw) == ([], {}, [], [])
    assert run(P.udp4("10.1.5.5", 53)).verdict == "XDP_PASS"


def test_a_replace_that_runs_out_of_room_changes_nothing(fw):
    """A real limit of the kernel's layout: more /24s holding two hosts each than there are
    tbl8 groups (TEST_CAPACITY: max_tbl8_groups 1024). Everything is undone: the store, the
    table, and every map entry written before the failure."""
    fw.replace_set("hosts", document({("10.9.0.1/32", None, None): ("drop", "", "hosts"),
                                      ("10.9.0.0/16", None, None): ("pass", "", "hosts")}))
    before = snapshot(fw)
    crowd = {}
    for i in range(1100):  # 1100 /24s, two hosts each: a group each
        for host in (1, 2):
            crowd[(f"10.{20 + i // 256}.{i % 256}.{host}/32", None, None)] = ("drop", "", "hosts")
    crowd[("10.8.0.0/16", None, None)] = ("drop", "", "hosts")
    with pytest.raises(MapFullError, match="tbl8"):
        fw.replace_set("hosts", document(crowd))
    assert snapshot(fw) == before
    assert fw.maps.v4_verdict(0x0A090001) != 0 and fw.maps.v4_verdict(0x0A080001) == 0


def test_a_replace_too_big_for_old_and_new_at_once_is_laid_out_again(fw, run):
    """In place, a replace writes every new entry before any old one goes: 700 /24s of two
    hosts each replaced by 700 others need 1400 tbl8 groups at once, more than the running
    half's 1024 (TEST_CAPACITY). Laid out in the other half instead (as a start does), they
    need 700. A small change after goes in place again."""
    def crowd(second_octet: int) -> dict:
        return {(f"10.{second_octet + i // 256}.{i % 256}.{host}/32", None, None):
                ("drop", "", "hosts") for i in range(700) for host in (1, 2)}

    fw.replace_set("hosts", document(crowd(20)))
    generation = fw.maps.v4.generation
    report = fw.replace_set("hosts", document(crowd(40)))
    assert (report.added, report.removed, report.kept) == (1400, 1400, 0)
    assert fw.maps.v4.generation != generation, "not laid out again"
    assert run(P.udp4("10.40.2.1", 53)).verdict == "XDP_DROP"
    assert run(P.udp4("10.20.2.1", 53)).verdict == "XDP_PASS"
    assert fw.sets() == {"hosts": 1400}
    generation = fw.maps.v4.generation
    fw.replace_set("hosts", document(crowd(40) | {("10.60.0.0/16", None, None): (
        "drop", "", "hosts")}))
    assert fw.maps.v4.generation == generation, "a small change was laid out again"
    assert run(P.udp4("10.60.1.1", 53)).verdict == "XDP_DROP"
    assert run(P.udp4("10.40.2.2", 53)).verdict == "XDP_DROP"


def test_a_large_change_beside_a_port_rule_is_laid_out_again(fw, run):
    """With a port rule anywhere a change is compiled, ~9 us a rule; one of 10,000 rules or
    more (and a tenth of what stays) is laid out again instead, ~1 us a rule kept. The port
    rules come through it; a small change after is compiled in place."""
    fw.add_rules([RuleSpec(parse_prefix("10.201.0.0/24"), Action.DROP, Proto.TCP, 22),
                  RuleSpec(parse_prefix("10.202.0.0/16"), Action.DROP)])
    hosts = {(f"10.{30 + i // 256}.{i % 256}.2/32", None, None): ("drop", "", "hosts")
             for i in range(12_000)}  # a /24 each (the test maps have 1024 tbl8 groups)
    generation = fw.maps.v4.generation
    report = fw.replace_set("hosts", document(hosts))
    assert report.added == 12_000 and fw.maps.v4.generation != generation
    assert run(P.udp4("10.30.7.2", 53)).verdict == "XDP_DROP"
    assert run(P.udp4("10.30.7.3", 53)).verdict == "XDP_PASS"
    assert run(P.tcp4("10.201.0.9", 22)).verdict == "XDP_DROP"
    assert run(P.tcp4("10.201.0.9", 23)).verdict == "XDP_PASS"
    assert run(P.udp4("10.202.3.4", 53)).verdict == "XDP_DROP"
    generation = fw.maps.v4.generation
    del hosts[("10.30.7.2/32", None, None)]
    fw.replace_set("hosts", document(hosts))
    assert fw.maps.v4.generation == generation
    assert run(P.udp4("10.30.7.2", 53)).verdict == "XDP_PASS"
    assert run(P.tcp4("10.201.0.9", 22)).verdict == "XDP_DROP"


def test_a_replace_whose_store_write_fails_changes_nothing(fw, monkeypatch):
    import sqlite3

    fw.replace_set("a", document({("10.1.0.0/16", None, None): ("drop", "", "a"),
                                  ("10.2.0.0/16", None, None): ("drop", "", "a")}))
    before = snapshot(fw)

    def full(*_):
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(fw.store, "insert_table_rows", full)
    with pytest.raises(sqlite3.OperationalError):
        fw.replace_set("a", document({("10.2.0.0/16", None, None): ("pass", "", "a"),
                                      ("10.3.0.0/16", None, None): ("drop", "", "a")}))
    assert snapshot(fw) == before
    assert fw.maps.v4_verdict(0x0A010001) != 0, "a removed prefix was not put back"


def test_two_replaces_at_once_each_apply_whole(fw):
    """Concurrent replaces of one set end as one of them, never a mix; of two sets, both."""
    a = {(f"10.0.{i}.0/24", None, None): ("drop", "", "x") for i in range(200)}
    b = {(f"10.1.{i}.0/24", None, None): ("drop", "", "x") for i in range(150)}
    y = {(f"10.2.{i}.0/24", None, None): ("pass", "", "y") for i in range(100)}
    errors = []

    def run(name, rules):
        try:
            fw.replace_set(name, document(rules))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=args)
               for args in (("x", a), ("x", b), ("y", y))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    got = table_state(fw)
    x = {k: v for k, v in got.items() if v[2] == "x"}
    assert x in (a, b), f"set x is a mix: {len(x)} rules"
    assert {k: v for k, v in got.items() if v[2] == "y"} == y
    check(fw, got, random.Random(1), "after concurrent replaces")


def test_bulk_delete_by_ids_set_and_comment_in_one_change(fw):
    """What was seen: 1,000 deletes were 1,000 requests. One request deletes them, all or
    nothing: an unknown id among them deletes none."""
    rules = fw.add_rules([RuleSpec(parse_prefix(f"10.{i // 256}.{i % 256}.0/24"), Action.DROP,
                                   comment="scan" if i % 2 else "scanners")
                          for i in range(1000)])
    ids = [r.id for r in rules]
    before = snapshot(fw)
    with pytest.raises(NotFoundError, match="no rule with id 999999"):
        fw.delete_where(ids=[*ids[:10], 999999])
    assert snapshot(fw) == before
    report = fw.delete_where(comment="scan")  # exactly: "scanners" stays
    assert report.removed == 500 and {r.comment for r in fw.list_rules()} == {"scanners"}
    report = fw.delete_where(ids=[r.id for r in fw.list_rules()])
    assert report.removed == 500 and fw.list_rules() == []
    assert fw.maps.prefix_keys() == [] and Store(fw.store.path).load_rules() == []
    fw.replace_set("s", document({("10.0.0.0/8", None, None): ("drop", "", "s")}))
    assert fw.delete_where(rule_set="s").removed == 1 and fw.sets() == {}
    with pytest.raises(NotFoundError, match="no set 's'"):
        fw.delete_where(rule_set="s")


def test_skip_existing_imports_only_what_is_new(fw):
    """What was seen: re-importing a feed answered 409."""
    first = Prefixes.of([parse_prefix(f"192.0.2.{i}") for i in range(10)])
    fw.add_prefixes(first, Action.DROP, "feed")
    with pytest.raises(ConflictError, match="exists already"):
        fw.add_prefixes(first, Action.DROP, "feed")
    more = Prefixes.of([parse_prefix(f"192.0.2.{i}") for i in range(5, 15)])
    ids = fw.add_prefixes(more, Action.DROP, "feed", skip_existing=True)
    assert len(ids) == 5 and len(fw.table) == 15
    assert not fw.add_prefixes(first, Action.DROP, "feed", skip_existing=True)


def test_sets_survive_a_restart_and_old_stores_still_load(fw, tmp_path):
    """A store written before sets existed (no rule_set columns, a tombstone row per id)
    opens, keeps every rule (in no set), and takes sets from then on."""
    import sqlite3

    from xdpfw.rules.store import BATCH_MIN

    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.executescript(OLD_SCHEMA)
    db.execute("INSERT INTO rules (id, addr, plen, proto, dport, action, comment, slot, created)"
               " VALUES (1, x'0a000000', 8, 'tcp', 22, 'drop', 'ssh', 0, 0)")
    n = BATCH_MIN
    import numpy as np

    ids = np.arange(2, 2 + n, dtype="<u8")
    addrs = np.zeros((n, 2), dtype=">u8")
    addrs[:, 1] = (11 << 24) + np.arange(n) * 256
    db.execute("INSERT INTO rule_batches (ids, slots, families, addrs, plens, proto, dport,"
               " action, comment, created) VALUES (?, ?, ?, ?, ?, '', 0, 'pass', 'feed', 0)",
               (ids.tobytes(), np.arange(1, 1 + n, dtype="<u4").tobytes(),
                bytes([V4]) * n, addrs.tobytes(), bytes([24]) * n))
    db.execute("INSERT INTO deleted_batch_rules (id) VALUES (5)")
    db.commit()
    db.close()
    store = Store(path)
    rules = store.load_rules()
    assert len(rules) == n and rules[0].comment == "ssh" and {r.rule_set for r in rules} == {""}
    assert 5 not in {r.id for r in rules}
    with store.transaction():
        store.delete_rules(list(range(6, 6 + 2 * BATCH_MIN // 3)))
    again = Store(path).load_rules()
    assert len(again) == n - 2 * BATCH_MIN // 3 and again[0].id == 1


OLD_SCHEMA = """
CREATE TABLE rules (id INTEGER PRIMARY KEY AUTOINCREMENT, addr BLOB NOT NULL,
    plen INTEGER NOT NULL, proto TEXT NOT NULL DEFAULT '', dport INTEGER NOT NULL DEFAULT 0,
    action TEXT NOT NULL, comment TEXT NOT NULL DEFAULT '', slot INTEGER NOT NULL,
    created REAL NOT NULL);
CREATE TABLE rule_batches (batch INTEGER PRIMARY KEY AUTOINCREMENT, ids BLOB NOT NULL,
    slots BLOB NOT NULL, families BLOB NOT NULL, addrs BLOB NOT NULL, plens BLOB NOT NULL,
    proto TEXT NOT NULL DEFAULT '', dport INTEGER NOT NULL DEFAULT 0, action TEXT NOT NULL,
    comment TEXT NOT NULL DEFAULT '', created REAL NOT NULL);
CREATE TABLE deleted_batch_rules (id INTEGER PRIMARY KEY);
CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


def test_deleting_every_rule_of_a_prefix_at_once_frees_its_entry_once(fw):
    """Three rules on one prefix deleted in one change touch the prefix three times: its
    verdict id must go back once, or two later prefixes share it (and one's verdict)."""
    p = "192.0.2.0/24"
    rules = fw.add_rules([RuleSpec(parse_prefix(p), Action.DROP),
                          RuleSpec(parse_prefix(p), Action.PASS, Proto.TCP),
                          RuleSpec(parse_prefix(p), Action.DROP, Proto.TCP, 23)])
    fw.delete_where(ids=[r.id for r in rules])
    assert fw.maps.prefix_keys() == []
    import time

    time.sleep(1.1)  # past the quarantine: freed ids are handed out again
    fw.add_rules([RuleSpec(parse_prefix("10.0.0.0/8"), Action.DROP),
                  RuleSpec(parse_prefix("11.0.0.0/8"), Action.PASS)])
    assert test_run(fw.program.fd, P.tcp4("10.1.1.1", 80)).verdict == "XDP_DROP"
    assert test_run(fw.program.fd, P.tcp4("11.1.1.1", 80)).verdict == "XDP_PASS"
