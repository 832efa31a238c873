"""Declarative rules ([state] rules_from_config): the config file's [[rules]] and [[sets]] are
the rules. Syncing makes the store equal to the file, removing a line removes the rule,
POST /api/v1/config/reload reads the file again, and the API changes no rule meanwhile."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from tests.test_api import snapshot
from xdpfw.api.app import create_app
from xdpfw.config import ConfigError, load_config
from xdpfw.declared import declared_rules
from xdpfw.rules.document import document_text, parse_text
from xdpfw.rules.kind import RuleKind
from xdpfw.rules.model import Action, parse_prefix
from xdpfw.service import RuleSpec

pytestmark = pytest.mark.bpf

CONFIG = """\
[state]
rules_from_config = true

[[rules]]
prefix = "203.0.113.0/24"
proto = "tcp"
dport = 22
comment = "ssh scanners"

[[rules]]
prefix = "10.0.0.0/8"
action = "pass"

[[sets]]
name = "feed"
file = "feed.txt"
prefixes = ["192.0.2.0/24"]
comment = "drop list"
"""


def state(fw) -> set[tuple]:
    return {(str(r.prefix), r.proto and r.proto.value, r.dport, r.action.value, r.comment,
             r.rule_set) for r in fw.list_rules()}


@pytest.fixture
def declared(fw, tmp_path):
    path = tmp_path / "xdpfw.toml"
    path.write_text(CONFIG)
    (tmp_path / "feed.txt").write_text("# today's list\n198.51.100.7\n198.51.100.8\n")
    yield path
    fw.rules_source = None  # the session's firewall goes on taking API changes


def test_the_file_is_the_truth_and_a_removed_line_removes_the_rule(fw, declared):
    """What was seen: [[rules]] only seeded the store; removing a line removed nothing."""
    fw.add_rules([RuleSpec(parse_prefix("172.16.0.0/12"), Action.DROP, comment="by hand")])
    report = fw.sync_config(declared_rules(load_config(declared), declared), str(declared))
    assert (report.added, report.removed) == (5, 1)
    assert state(fw) == {
        ("203.0.113.0/24", "tcp", 22, "drop", "ssh scanners", ""),
        ("10.0.0.0/8", None, None, "pass", "", ""),
        ("192.0.2.0/24", None, None, "drop", "drop list", "feed"),
        ("198.51.100.7/32", None, None, "drop", "drop list", "feed"),
        ("198.51.100.8/32", None, None, "drop", "drop list", "feed")}
    ids = {r.prefix: r.id for r in fw.list_rules()}
    declared.write_text(CONFIG.replace('[[rules]]\nprefix = "10.0.0.0/8"\naction = "pass"\n', ""))
    (declared.parent / "feed.txt").write_text("198.51.100.7\n")
    with TestClient(create_app(fw, config_path=str(declared))) as c:
        r = c.post("/api/v1/config/reload", params={"dry_run": "true"})
        assert (r.json()["removed"], r.json()["dry_run"]) == (2, True), r.text
        r = c.post("/api/v1/config/reload")
        assert r.status_code == 200 and (r.json()["removed"], r.json()["kept"]) == (2, 3), r.text
    assert {str(r.prefix) for r in fw.list_rules()} == {
        "203.0.113.0/24", "192.0.2.0/24", "198.51.100.7/32"}
    assert all(ids[r.prefix] == r.id for r in fw.list_rules()), "kept rules changed ids"


def test_the_api_changes_no_rule_while_the_file_holds_them(fw, declared):
    fw.sync_config(declared_rules(load_config(declared), declared), str(declared))
    before = snapshot(fw)
    with TestClient(create_app(fw, config_path=str(declared))) as c:
        for method, path, kw in [
            ("POST", "/api/v1/rules", {"json": {"prefix": "11.0.0.0/8"}}),
            ("POST", "/api/v1/rules/bulk", {"json": {"prefixes": ["11.0.0.0/8"]}}),
            ("PUT", "/api/v1/sets/feed", {"json": {"prefixes": ["11.0.0.0/8"]}}),
            ("DELETE", "/api/v1/sets/feed", {}),
            ("POST", "/api/v1/rules/delete", {"json": {"set": "feed"}}),
            ("DELETE", f"/api/v1/rules/{fw.list_rules()[0].id}", {}),
        ]:
            r = c.request(method, path, **kw)
            assert r.status_code == 409 and "xdpfw reload" in r.text, (path, r.text)
        r = c.put("/api/v1/sets/feed", json={"prefixes": ["11.0.0.0/8"]},
                  params={"dry_run": "true"})
        assert r.status_code == 200, r.text  # a dry run changes nothing: allowed
    assert snapshot(fw) == before


def test_a_bad_file_is_refused_naming_its_line_and_changes_nothing(fw, declared):
    fw.sync_config(declared_rules(load_config(declared), declared), str(declared))
    before = snapshot(fw)
    with TestClient(create_app(fw, config_path=str(declared))) as c:
        (declared.parent / "feed.txt").write_text("198.51.100.7\n198.51.100.300\n")
        r = c.post("/api/v1/config/reload")
        assert r.status_code == 422 and "feed.txt: line 2" in r.text and ":15:" in r.text, \
            r.text
        (declared.parent / "feed.txt").write_text("198.51.100.7\n")
        declared.write_text(CONFIG.replace('dport = 22', 'dport = "ssh"'))
        r = c.post("/api/v1/config/reload")
        assert r.status_code == 422 and "xdpfw.toml:7" in r.text, r.text
        declared.write_text(CONFIG.replace("rules_from_config = true", ""))
        r = c.post("/api/v1/config/reload")
        assert r.status_code == 409 and "takes a restart" in r.text, r.text
        (declared.parent / "feed.txt").unlink()
        declared.write_text(CONFIG)
        r = c.post("/api/v1/config/reload")
        assert r.status_code == 422 and "No such file" in r.text, r.text
    assert snapshot(fw) == before


def test_sets_in_the_config_are_checked(tmp_path):
    path = tmp_path / "x.toml"
    for text, reason in [
        ('[[sets]]\nname = "../etc"\n', "not a set name"),
        ('[[sets]]\nname = "a"\n[[sets]]\nname = "a"\n', "defined twice"),
        ('[[sets]]\nname = "a"\nset = "b"\n', "leave it out"),
        ('[[sets]]\nname = "a"\nfile = "f.txt"\n', "No such file"),
    ]:
        path.write_text(text)
        with pytest.raises(ConfigError, match=reason):
            declared_rules(load_config(path), path)
    (tmp_path / "f.txt").write_text('@rules {"set": "other"}\n10.0.0.0/8\n')
    path.write_text('[[sets]]\nname = "a"\nfile = "f.txt"\n')
    with pytest.raises(ConfigError, match=r"f\.txt: these rules name set 'other'"):
        declared_rules(load_config(path), path)


def test_a_declared_document_reads_back_from_its_text(declared):
    doc = declared_rules(load_config(declared), declared)
    back = parse_text(document_text(doc), RuleKind())
    assert [(len(s.prefixes), s.kind) for s in back.sections] == [
        (len(s.prefixes), s.kind) for s in doc.sections]
