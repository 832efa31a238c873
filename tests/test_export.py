"""Export and restore (GET /api/v1/rules/export, PUT /api/v1/rules): a million rules, in
sets, with comments, protocols and ports, exported from one appliance and imported with
--replace into a fresh one give back identical rules; the export format's details."""

from __future__ import annotations

import json

import numpy as np
import pytest
from fastapi.testclient import TestClient

from tests.conftest import TEST_CAPACITY, isolated_program_config, remove_pins
from tests.prefix_gen import v4_prefixes
from xdpfw.api.app import create_app
from xdpfw.errors import RuleValidationError
from xdpfw.rules import document as D
from xdpfw.rules.kind import RuleKind
from xdpfw.rules.model import Action, Proto, parse_prefix
from xdpfw.rules.table import Prefixes
from xdpfw.service import Firewall, RuleSpec

pytestmark = pytest.mark.bpf

MILLION = 1_000_000


def big_firewall(tmp_path_factory, name: str):
    cfg = isolated_program_config()
    cfg = type(cfg)(pin_dir=cfg.pin_dir, **{**TEST_CAPACITY, "max_rules": 1 << 20,
                                            "max_tbl8_groups": 65_536})
    return Firewall(tmp_path_factory.mktemp(name), cfg), cfg


def columns(fw) -> dict[str, np.ndarray]:
    """Every rule's match and kind, in one canonical order (comments and sets as text)."""
    t = fw.table
    rows = t.rows()
    c = {k: t.col[k][rows] for k in ("family", "hi", "lo", "plen", "proto", "dport", "action")}
    c["comment"] = np.array(t.comments, dtype=object)[t.col["comment"][rows]]
    c["set"] = np.array(t.sets, dtype=object)[t.col["set"][rows]]
    order = np.lexsort([c[k] for k in ("dport", "proto", "plen", "lo", "hi", "family")])
    return {k: v[order] for k, v in c.items()}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """An appliance holding a million rules (three sets, rules in no set with comments, port
    rules, IPv6), and its text export."""
    fw, cfg = big_firewall(tmp_path_factory, "source")
    try:
        rng = np.random.default_rng(12)
        v4 = v4_prefixes(rng, MILLION - 1100)
        parts = [(0, 600_000, "drop", "spamhaus", "drop list"),
                 (600_000, 850_000, "drop", "scanners", 'shodan "and" friends # 2024'),
                 (850_000, 950_000, "pass", "partners", "")]
        for lo, hi, action, name, comment in parts:
            fw.replace_set(name, D.RuleDocument([D.Section(
                v4.take(slice(lo, hi)), RuleKind(action=action, comment=comment, set=name))]))
        rest = v4.take(slice(950_000, len(v4)))
        for i in range(0, len(rest), 10_000):
            fw.add_prefixes(rest.take(slice(i, i + 10_000)), Action.DROP, f"batch {i}: ünï")
        v6 = [parse_prefix(f"2001:db8:{i:x}::/48") for i in range(1000)] + [
            parse_prefix(f"2001:db8:ffff::{i:x}") for i in range(50)]
        fw.add_prefixes(Prefixes.of(v6), Action.DROP, "", rule_set="v6")
        fw.add_rules([RuleSpec(parse_prefix(f"198.18.{i}.0/24"), Action.PASS, Proto.TCP,
                               22 + i % 3, "ssh", "ssh" if i % 2 else "") for i in range(50)])
        assert len(fw.table) == MILLION
        text = b"".join(D.write_text(fw.export()))
        yield fw, text
    finally:
        fw.close()
        remove_pins(cfg.pin_dir)


def test_a_million_rules_export_and_import_replace_give_identical_rules(exported,
                                                                        tmp_path_factory):
    """What was seen: no save/restore (the list stops at 10,000 a page, and its JSON cannot
    be imported). Text and JSON both bring back the very same rules."""
    source, text = exported
    assert text.count(b"\n") > MILLION
    target, cfg = big_firewall(tmp_path_factory, "target")
    try:
        target.add_rules([RuleSpec(parse_prefix("10.0.0.0/8"), Action.DROP, comment="old")])
        report = target.replace_all(D.parse_text(text, RuleKind()))
        assert (report.added, report.removed) == (MILLION, 1)
        want = columns(source)
        got = columns(target)
        for k in want:
            assert np.array_equal(got[k], want[k]), f"column {k} differs after the restore"
        assert b"".join(D.write_text(target.export())) == text
        as_json = b"".join(D.write_json(target.export()))
        json.loads(as_json)  # well-formed
        again = target.replace_all(D.parse_json(as_json))
        assert (again.added, again.removed, again.changed, again.kept) == (0, 0, 0, MILLION)
        assert target.sets() == source.sets()
    finally:
        target.close()
        remove_pins(cfg.pin_dir)


def test_import_replace_of_an_export_onto_itself_changes_nothing(exported):
    fw, text = exported
    ids = fw.table.column("id").copy()
    report = fw.replace_all(D.parse_text(text, RuleKind()))
    assert (report.added, report.removed, report.changed, report.kept) == (0, 0, 0, MILLION)
    assert np.array_equal(fw.table.column("id"), ids)


def test_the_export_route_streams_every_rule(fw):
    """More than one page of the list (10,000), in both formats."""
    prefixes = Prefixes.of([parse_prefix(f"10.{i >> 8}.{i & 255}.0/24") for i in range(12_000)])
    fw.add_prefixes(prefixes, Action.DROP, "feed", rule_set="f")
    with TestClient(create_app(fw)) as c:
        text = c.get("/api/v1/rules/export").content
        as_json = c.get("/api/v1/rules/export", params={"format": "json"}).json()
        assert c.get("/api/v1/rules", params={"limit": 10_001}).status_code == 422
    assert text.splitlines()[1] == b'@rules {"action": "drop", "comment": "feed", "set": "f"}'
    assert len(text.splitlines()) == 12_002
    assert as_json["sections"][0]["set"] == "f" and len(as_json["sections"][0]["prefixes"]) \
        == 12_000


def test_the_text_format_reads_what_it_writes_and_names_bad_lines(fw):
    text = ("# a hand-written file\n192.0.2.0/24\n"
            '@rules {"action": "pass", "proto": "tcp", "dport": 443, "comment": "a # b"}\n'
            "10.0.0.0/8   # office\n2001:db8::/32\n"
            '@rules {"set": "feed"}\n198.51.100.7\n')
    doc = D.parse_text(text.encode(), RuleKind(comment="default"))
    assert [(len(s.prefixes), s.kind.action.value, s.kind.comment, s.kind.set)
            for s in doc.sections] == [(1, "drop", "default", ""), (2, "pass", "a # b", ""),
                                       (1, "drop", "", "feed")]
    for bad, where in [
        ("10.0.0.0/8\n@rules {\"action\": \"pass\"\n", "line 2"),
        ('@rules {"set": "../etc"}\n', "line 1"),
        ('@rules {"colour": "red"}\n', "line 1"),
        ('\n\n@rules {}\n10.0.0.0/8\n10.0.0.1/8\n', "line 5"),
        ('@rules {}\n1.2.3.4\n@rules {}\n\n5.6.7.300\n', "line 5"),
        ("@ {}\n", "line 1"),
    ]:
        with pytest.raises(RuleValidationError, match=where):
            D.parse_text(bad.encode(), RuleKind())
