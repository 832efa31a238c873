"""The fleet's keys and values (pure Python): what a node accepts from etcd, and the config."""

from __future__ import annotations

import json

import pytest

from xdpfw.config import ConfigError, load_config
from xdpfw.errors import RuleValidationError
from xdpfw.fleet.etcd import prefix_end
from xdpfw.fleet.layout import Keys, decode_rule, encode_rule, match_of_key
from xdpfw.rules.model import Action, Proto, parse_prefix
from xdpfw.service import RuleSpec

KEYS = Keys.under("/xdpfw/")


def test_a_rule_round_trips_through_its_key_and_value():
    spec = RuleSpec(parse_prefix("10.1.0.0/16"), Action.DROP, Proto.TCP, 22, "ssh")
    key = KEYS.rule(spec.prefix, spec.proto, spec.dport)
    assert key == b"/xdpfw/data/rules/10.1.0.0/16|tcp|22"
    rule = decode_rule(KEYS, key, encode_rule(7, spec))
    assert (rule.id, rule.spec) == (7, spec)
    assert match_of_key(KEYS, key) == (spec.prefix, Proto.TCP, 22)


@pytest.mark.parametrize("key, value, why", [
    ("10.0.0.0/8|any|0", b"{not json", "not JSON"),
    ("10.0.0.0/8|any|0", b"[1, 2]", "not a JSON object"),
    ("10.0.0.0/8|any|0", b'{"prefix": "10.0.0.0/8", "action": "drop"}', "id must be"),
    ("10.0.0.0/8|any|0", b'{"id": true, "prefix": "10.0.0.0/8", "action": "drop"}',
     "id must be"),
    ("10.0.0.0/8|any|0", b'{"id": 1, "prefix": "10.0.0.1/8", "action": "drop"}',
     "host bits"),
    ("10.0.0.0/8|any|0", b'{"id": 1, "prefix": "10.0.0.0/8", "action": "reject"}', "action"),
    ("10.0.0.0/8|any|0", b'{"id": 1, "prefix": "10.0.0.0/8", "action": "drop", "x": 1}',
     "x"),
    ("10.0.0.0/8|any|0", b'{"id": 1, "prefix": "10.0.0.0/8", "dport": 22}', "protocol"),
    ("10.0.0.0/8|any|0", b'{"id": 1, "prefix": "11.0.0.0/8", "action": "drop"}',
     "does not name its rule"),
    ("10.0.0.0/8|any|0", b"x" * 5000, "more than a rule can be"),
    ("10.0.0.0/8|any|0", b'{"id": 1, "prefix": "10.0.0.0/8", "action": "drop", "set": "a"}',
     "set: a fleet set is a manifest"),
])
def test_a_value_that_is_not_its_rule_is_refused(key, value, why):
    with pytest.raises(RuleValidationError, match=why):
        decode_rule(KEYS, KEYS.rules + key.encode(), value)


@pytest.mark.parametrize("name", ["junk", "10.0.0.0/8", "10.0.0.1/8|any|0", "10.0.0.0/8|gre|0",
                                  "10.0.0.0/8|tcp|x", "10.0.0.0/08|any|0", "10.0.0.0/8|any|00"])
def test_malformed_rule_keys_name_no_match(name):
    assert match_of_key(KEYS, KEYS.rules + name.encode()) is None


def test_prefix_end_covers_the_prefix():
    assert prefix_end(b"/xdpfw/") == b"/xdpfw0"
    assert prefix_end(b"a\xff") == b"b"
    assert prefix_end(b"\xff") == b"\0"


def _config(tmp_path, text):
    path = tmp_path / "c.toml"
    path.write_text(text)
    return load_config(path)


def test_fleet_config_is_read_and_checked(tmp_path):
    cfg = _config(tmp_path, '[fleet]\netcd = ["http://127.0.0.1:2379"]\nnode = "edge-1"\n')
    assert cfg.fleet.prefix == "/xdpfw/" and cfg.fleet.node == "edge-1"
    for bad, why in [
        ('etcd = ["127.0.0.1:2379"]\nnode = "a"', "http"),
        ('etcd = []\nnode = "a"', "etcd"),
        ('etcd = ["http://h:1"]\nnode = "a b"', "node"),
        ('etcd = ["http://h:1"]\nnode = "a"\nprefix = "xdpfw"', "prefix"),
        ('etcd = ["http://h:1"]\nnode = "a"\ncert_file = "c.pem"', "key_file"),
    ]:
        with pytest.raises(ConfigError, match=why):
            _config(tmp_path, f"[fleet]\n{bad}\n")


@pytest.mark.parametrize(("extra", "why"), [
    ('[[rules]]\nprefix = "10.0.0.0/8"\n', r"\[\[rules\]\] cannot seed"),
    ('[[sets]]\nname = "feed"\nprefixes = ["10.0.0.0/8"]\n', r"\[\[sets\]\] cannot seed"),
    ('[state]\nrules_from_config = true\n', "rules_from_config cannot be on with"),
])
def test_config_rules_cannot_seed_a_fleet_node(tmp_path, extra, why):
    with pytest.raises(ConfigError, match=why) as e:
        _config(tmp_path, '[fleet]\netcd = ["http://h:1"]\nnode = "a"\n' + extra)
    assert "etcd" in str(e.value)


def test_encoded_values_are_compact_json():
    spec = RuleSpec(parse_prefix("2001:db8::/32"), Action.PASS)
    assert json.loads(encode_rule(3, spec)) == {
        "id": 3, "prefix": "2001:db8::/32", "action": "pass", "proto": None, "dport": None,
        "comment": ""}
