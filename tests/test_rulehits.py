"""The dashboard's top rules over the last minute, against the real counters."""

from __future__ import annotations

import pytest

from tests import packets as P
from tests.test_program import add
from xdpfw.rulehits import RuleHits

pytestmark = pytest.mark.bpf


def test_top_rules_count_the_hits_since_the_oldest_reading(fw, run):
    busy, quiet, idle = (add(fw, f"203.0.113.{i}/32", "drop") for i in range(3))
    run(P.udp4("203.0.113.0", 9), repeat=50)  # before the first reading: not in the window
    hits = RuleHits(fw)
    window, top = hits.top()
    assert top == [] and window == 0, "the first reading has nothing to compare with"
    run(P.udp4("203.0.113.0", 9), repeat=7)
    run(P.udp4("203.0.113.1", 9), repeat=3)
    window, top = hits.top(limit=5)
    assert window > 0
    assert [(h.rule_id, h.packets) for h in top] == [(busy.id, 7), (quiet.id, 3)], top
    assert idle.id not in {h.rule_id for h in top}, "a rule without hits is listed"
    window, top = hits.top(limit=1)
    assert [(h.rule_id, h.packets) for h in top] == [(busy.id, 7)]
