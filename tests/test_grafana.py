"""docs/grafana/xdpfw.json: every expression of the dashboard names metrics the daemon exports
(scraped from the real collectors, the load balancer's among them, with traffic and a
service)."""

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
from xdpfw.httpserver import ConnectionGuard, GuardCollector, TcpLimits

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


def test_every_dashboard_expression_names_an_exported_metric(fw, run, unresolving_lb):
    add(fw, "198.51.100.0/24", "drop")
    run(P.udp4("198.51.100.7", 9))
    capture = CaptureHub(fw.dp)
    app = create_app(fw, events=EventHub(fw.dp, fw), capture=capture, lb=unresolving_lb)
    # as the daemon does once its TCP listeners exist
    app.state.metrics.register(GuardCollector({"api": ConnectionGuard(TcpLimits())}))
    client = TestClient(app)
    r = client.post("/api/v1/services", json={  # the LB's families have series too
        "name": "web", "vip": "10.97.0.1", "port": 80})  # no backend: none resolves here
    assert r.status_code == 201, r.text
    text = client.get("/metrics").text
    names = exported(text)
    # The backend and proxy families are there without samples (their names are checked).
    assert {"xdpfw_service_packets_total", "xdpfw_backend_in_table",
            "xdpfw_proxy_connections_total", "xdpfw_proxy_bytes_total",
            "xdpfw_tcp_connections_refused_total"} <= names, text[-2000:]
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = expressions(dashboard)
    assert len(exprs) >= 10, f"only {len(exprs)} expressions found in {DASHBOARD}"
    unknown = {(m, e) for e in exprs for m in METRIC.findall(e) if m not in names}
    assert not unknown, f"expressions name metrics nobody exports: {sorted(unknown)}"
    assert all(METRIC.search(e) for e in exprs), "an expression names no metric at all"
