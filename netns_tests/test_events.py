"""Sampled drop events end to end: a ping that a rule drops shows up in `xdpfw watch`, and the
live daemon's /metrics parses with Prometheus' text parser."""

from __future__ import annotations

import subprocess
import sys

from prometheus_client.parser import text_string_to_metric_families

from netns_tests.traffic import ping
from xdpfw import netns as nsutil


def test_watch_shows_a_dropped_ping(daemon, pair, guarded):
    api = daemon.client()
    guarded("native")
    r = api.put("/api/v1/events/config", json={"sample_rate": 1})
    assert r.status_code == 200, r.text
    rule = api.post("/api/v1/rules", json={"prefix": f"{pair.client4}/32", "action": "drop",
                                           "proto": "icmp"}).json()
    watch = subprocess.Popen(
        [sys.executable, "-m", "xdpfw", "watch", "--count", "1", "--seconds", "20",
         "--socket", daemon.socket],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        subscribed = nsutil.wait_until(
            lambda: api.get("/api/v1/events/config").json()["subscribers"] >= 1, timeout=10)
        assert subscribed, f"xdpfw watch did not subscribe: {watch.stderr.read()}"
        res = ping(pair.client, pair.server4, count=1)
        assert not res.ok, f"the ping should be dropped: {res.detail}"
        out, err = watch.communicate(timeout=25)
    finally:
        watch.kill()
    assert watch.returncode == 0, f"xdpfw watch rc={watch.returncode}: {err}"
    want = (f"drop icmp {pair.client4} -> {pair.server4} on {pair.server_if} "
            f"(netns {pair.server}): rule_drop, rule {rule['id']}")
    assert want in out, f"expected {want!r} in:\n{out}{err}"

    api.put("/api/v1/events/config", json={"sample_rate": 0})
    metrics = api.get("/metrics")
    assert metrics.status_code == 200, metrics.text
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(metrics.text) for s in fam.samples}
    read = samples[("xdpfw_events_total", (("outcome", "read"),))]
    assert read >= 1, samples
    attached = samples[("xdpfw_interface_attached", (("interface", pair.server_if),
                                                    ("mode", "native"),
                                                    ("netns", pair.server)))]
    assert attached == 1, metrics.text
    dropped = samples[("xdpfw_interface_packets_total", (("interface", pair.server_if),
                                                        ("netns", pair.server),
                                                        ("verdict", "dropped")))]
    assert dropped >= 1, metrics.text
