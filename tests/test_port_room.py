"""port_rules room: adds stop at max_port_rules entries, and a delete is never refused for
room, although removing an "any" rule can split inherited entries into many more."""

from __future__ import annotations

import pytest

from tests import packets as P
from tests.test_program import add
from xdpfw.errors import MapFullError
from xdpfw.rules.model import Action, Proto, parse_prefix
from xdpfw.service import RuleSpec

pytestmark = pytest.mark.bpf


def test_a_delete_that_needs_more_port_entries_is_not_refused(fw, run):
    cap = fw.config.max_port_rules
    k = cap // 2 - 8
    # 10/8 holds k port rules and no "any" rule; 10.1/16 an "any" rule that shadows them.
    fw.add_rules([RuleSpec(parse_prefix("10.0.0.0/8"), Action.DROP, Proto.TCP, d)
                  for d in range(1, k + 1)])
    shadow = add(fw, "10.1.0.0/16", "pass")
    add(fw, "10.1.0.0/16", "drop", "udp", 53)
    # Fill the rest of the room with port-only /24s (2 entries each: the match and STRICT).
    fill = (cap - fw.index.port_entry_count) // 2
    fw.add_rules([RuleSpec(parse_prefix(f"192.168.{i // 256}.{i % 256}/32"), Action.DROP,
                           Proto.UDP, 53) for i in range(fill)])
    entries = fw.index.port_entry_count
    assert cap - 2 < entries <= cap, entries

    with pytest.raises(MapFullError, match="max_port_rules"):
        add(fw, "172.16.0.0/12", "drop", "tcp", 22)
    assert fw.index.port_entry_count == entries, "a refused add changed the index"

    # 10.1/16 now inherits the k port rules of 10/8: ~k more entries than max_port_rules
    # allows an add, and the delete goes through.
    assert run(P.tcp4("10.1.2.3", 5)).verdict == "XDP_PASS"
    fw.delete_rule(shadow.id)
    assert fw.index.port_entry_count > cap
    assert run(P.tcp4("10.1.2.3", 5)).verdict == "XDP_DROP", "the inherited tcp/5 drop"
    assert run(P.tcp4("10.1.2.3", k + 5)).verdict == "XDP_PASS"
