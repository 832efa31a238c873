"""The [metrics] listener of a real daemon: /metrics alone, read-only, without a token,
readable by Prometheus' text parser; the API's TCP side still wants its token."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families


def test_the_metrics_listener_serves_metrics_and_nothing_else(tcp_daemon):
    with httpx.Client(base_url=tcp_daemon.metrics_url, timeout=10) as c:
        r = c.get("/metrics")
        assert r.status_code == 200, r.text
        families = {f.name: f for f in text_string_to_metric_families(r.text)}
        for name in ("xdpfw_packets", "xdpfw_rules", "xdpfw_program_loaded",
                     "xdpfw_capture_packets", "process_cpu_seconds",
                     "process_resident_memory_bytes"):
            assert name in families, f"{name} missing from the listener: {sorted(families)}"
        for method in ("POST", "PUT", "DELETE", "PATCH"):
            w = c.request(method, "/metrics", content=b"{}")
            assert w.status_code == 405, f"{method} /metrics: {w.status_code} {w.text}"
        # The API is not there, neither its reads nor its writes, token or not.
        headers = {"Authorization": f"Bearer {tcp_daemon.token}"}
        for method, path in (("GET", "/api/v1/rules"), ("POST", "/api/v1/rules"),
                             ("POST", "/api/v1/shutdown"), ("GET", "/ui/"), ("GET", "/docs")):
            w = c.request(method, path, json={"prefix": "10.0.0.0/8", "action": "drop"},
                          headers=headers)
            assert w.status_code == 404, f"{method} {path}: {w.status_code} {w.text}"
    with tcp_daemon.daemon.client() as api:
        assert api.get("/api/v1/rules").json()["total"] == 0, "a write went through"
    with httpx.Client(base_url=tcp_daemon.api_url, timeout=10) as c:
        assert c.get("/metrics").status_code == 401, "the API's /metrics lost its token"
