"""docs/grafana/xdpfw.json: every expression of the dashboard names metrics the daemon exports
(scraped from the real collectors, with traffic, so no family is empty)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from tests import packets as P
from tests.test_program import add
from xdpfw.api.app import create_app
from xdpfw.capture import CaptureHub
from xdpfw.events import EventHub

pytestmark = pytest.mark.bpf

DASHBOARD = Path(__file__).resolve().parent.parent / "docs" / "grafana" / "xdpfw.json"
METRIC = re.compile(r"\b((?:xdpfw|process|python)_[a-z0-9_]+)\b")


def expressions(node) -> list[str]:
    """Every PromQL expression of the dashboard: panel targets and template queries."""
    out = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("expr", "definition") and isinstance(value, str):
                out.append(value)
            elif key == "query" and isinstance(value, dict) and "query" in value:
                out.append(value["query"])
            else:
                out += expressions(value)
    elif isinstance(node, list):
        for item in node:
            out += expressions(item)
    return out


def exported(text: str) -> set[str]:
    names = set()
    for family in text_string_to_metric_families(text):
        names.add(family.name)
        if family.type == "counter":
            names.add(family.name + "_total")
        names |= {s.name for s in family.samples}
    return names


def test_every_dashboard_expression_names_an_exported_metric(fw, run):
    add(fw, "198.51.100.0/24", "drop")
    run(P.udp4("198.51.100.7", 9))
    capture = CaptureHub(fw.dp)
    app = create_app(fw, events=EventHub(fw.dp, fw), capture=capture)
    names = exported(TestClient(app).get("/metrics").text)
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = expressions(dashboard)
    assert len(exprs) >= 10, f"only {len(exprs)} expressions found in {DASHBOARD}"
    unknown = {(m, e) for e in exprs for m in METRIC.findall(e) if m not in names}
    assert not unknown, f"expressions name metrics nobody exports: {sorted(unknown)}"
    assert all(METRIC.search(e) for e in exprs), "an expression names no metric at all"
