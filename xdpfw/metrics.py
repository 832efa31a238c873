"""Prometheus metrics, read from the kernel's maps at scrape time (nothing is cached).

Every app gets its own CollectorRegistry (no import-time global), so tests and the daemon each
wire their own; other parts of the appliance (the load balancer) register their collectors on
`app.state.metrics`.

Per-rule series are bounded, so that a blocklist under attack (every prefix matching) cannot
make a scrape a million series: the `top_rules` rules with the most hits get a series each,
and every rule that matched is counted in its set's total. A rule's set is its named set
(PUT /api/v1/sets/{name}); a rule in no named set counts under its comment, as before named
sets existed (a blocklist imported in one go shares one; no comment: set ""). The `max_sets`
sets with the most hits get a series each, the rest are summed under "_other".
"""

from __future__ import annotations

import heapq
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from xdpfw.dataplane import abi
from xdpfw.dataplane.dataplane import Dataplane
from xdpfw.rules.model import Action
from xdpfw.service import Firewall

# The XDP action of each reason: a forwarded or dropped packet is never labelled "pass".
VERDICT_OF_REASON = {abi.REASON_NAMES[r]: v for r, v in abi.REASON_VERDICTS.items()}


OTHER_SETS = "_other"


class EventStats(Protocol):
    def metrics(self) -> dict[str, int]: ...


class CaptureStats(Protocol):
    def status(self) -> dict: ...


@dataclass(frozen=True)
class RuleSeries:
    """How many per-rule and per-set series a scrape may hold ([metrics] in the config)."""

    top_rules: int = 20
    max_sets: int = 50


class FirewallCollector(Collector):
    """Counters from the Dataplane's maps, named by the Firewall's read views."""

    def __init__(self, firewall: Firewall, dataplane: Dataplane,
                 events: EventStats | None = None, series: RuleSeries | None = None,
                 capture: CaptureStats | None = None) -> None:
        self.fw = firewall
        self.dp = dataplane
        self.events = events
        self.series = series or RuleSeries()
        self.capture = capture

    def collect(self) -> Iterator[Metric]:
        yield from self._program()
        yield from self._verdicts()
        yield from self._interfaces()
        yield from self._rules()
        yield from self._maps()
        if self.events is not None:
            yield from self._events()
        if self.capture is not None:
            yield from self._capture()

    def _program(self) -> Iterator[Metric]:
        build = self.dp.build()
        loaded = GaugeMetricFamily(
            "xdpfw_program_loaded", "1 when the XDP program is loaded (value: its id in labels)",
            labels=["prog_id", "tag", "source"],
        )
        loaded.add_metric([str(build.info.id), build.info.tag, build.source.name], 1)
        yield loaded

    def _verdicts(self) -> Iterator[Metric]:
        pk = CounterMetricFamily(
            "xdpfw_packets", "Packets by verdict and reason (every packet counted once)",
            labels=["verdict", "reason"],
        )
        by = CounterMetricFamily(
            "xdpfw_bytes", "Bytes by verdict and reason", labels=["verdict", "reason"]
        )
        for reason, (p, b) in self.dp.maps.reason_totals().items():
            labels = [VERDICT_OF_REASON.get(reason, "other"), reason]
            pk.add_metric(labels, p)
            by.add_metric(labels, b)
        yield pk
        yield by

    def _interfaces(self) -> Iterator[Metric]:
        labels = ["interface", "netns", "verdict"]
        pk = CounterMetricFamily("xdpfw_interface_packets", "Packets per guarded interface",
                                 labels=labels)
        by = CounterMetricFamily("xdpfw_interface_bytes", "Bytes per guarded interface",
                                 labels=labels)
        attached = GaugeMetricFamily(
            "xdpfw_interface_attached",
            "1 when the kernel runs this appliance's program on the interface, else 0",
            labels=["interface", "netns", "mode"],
        )
        for att, link in self.fw.links():  # a link that vanished is not guarded
            name, netns = att.record.name, att.record.netns or ""
            for verdict, (p, b) in self.dp.maps.iface_totals(att.record.slot).items():
                pk.add_metric([name, netns, verdict], p)
                by.add_metric([name, netns, verdict], b)
            mode = link.mode or att.mode_in_use
            attached.add_metric([name, netns, str(mode)], int(link.current))
        yield pk
        yield by
        yield attached

    def _rules(self) -> Iterator[Metric]:
        labels = ["rule_id", "prefix", "action"]
        pk = CounterMetricFamily(
            "xdpfw_rule_packets", f"Packets decided by each of the {self.series.top_rules} "
            "rules with the most hits (xdpfw_rule_set_packets_total counts them all)",
            labels=labels)
        by = CounterMetricFamily("xdpfw_rule_bytes", "Bytes decided by each of the rules with "
                                 "the most hits", labels=labels)
        set_pk = CounterMetricFamily(
            "xdpfw_rule_set_packets", "Packets decided by the rules of a set (a named set, or "
            f"for rules in none, their comment); sets past the {self.series.max_sets} with the "
            f"most hits are summed under set=\"{OTHER_SETS}\"", labels=["set"])
        set_by = CounterMetricFamily("xdpfw_rule_set_bytes", "Bytes decided by the rules of a "
                                     "set", labels=["set"])
        matched = GaugeMetricFamily("xdpfw_rules_matched", "Rules that have matched at least "
                                    "once (each is in a set's total, the top ones in series "
                                    "of their own)")
        count = GaugeMetricFamily("xdpfw_rules", "Rules configured", labels=["action"])
        counters = self.fw.rule_counters()
        for r, p, b in heapq.nlargest(self.series.top_rules, counters, key=lambda c: c[1]):
            lv = [str(r.id), str(r.prefix), r.action.value]
            pk.add_metric(lv, p)
            by.add_metric(lv, b)
        sets: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for r, p, b in counters:
            total = sets[r.rule_set or r.comment]
            total[0] += p
            total[1] += b
        top = heapq.nlargest(self.series.max_sets, sets.items(), key=lambda kv: kv[1][0])
        other = [0, 0]
        for name in set(sets) - {name for name, _ in top}:
            other[0] += sets[name][0]
            other[1] += sets[name][1]
        for name, (p, b) in [*top, *([(OTHER_SETS, other)] if len(sets) > len(top) else [])]:
            set_pk.add_metric([name], p)
            set_by.add_metric([name], b)
        matched.add_metric([], len(counters))
        actions = self.fw.rules_by_action()
        for action in (Action.DROP, Action.PASS):
            count.add_metric([action.value], actions.get(action, 0))
        yield from (pk, by, set_pk, set_by, matched, count)

    def _maps(self) -> Iterator[Metric]:
        occupancy = self.fw.occupancy()
        entries = GaugeMetricFamily("xdpfw_map_entries", "Entries in a BPF map", labels=["map"])
        capacity = GaugeMetricFamily("xdpfw_map_capacity", "max_entries of a BPF map",
                                     labels=["map"])
        for name, (used, cap) in occupancy.items():
            entries.add_metric([name], used)
            capacity.add_metric([name], cap)
        yield entries
        yield capacity

    def _events(self) -> Iterator[Metric]:
        stats = self.events.metrics()
        yield GaugeMetricFamily(
            "xdpfw_event_sample_rate", "1 in N drops is sampled as an event (0: off)",
            value=stats["sample_rate"],
        )
        c = CounterMetricFamily(
            "xdpfw_events", "Drop events read from the ring buffer, and those not delivered to a "
            "slow client (its queue was full)", labels=["outcome"],
        )
        c.add_metric(["read"], stats["read"])
        c.add_metric(["dropped_slow_client"], stats["dropped_slow_client"])
        yield c


    def _capture(self) -> Iterator[Metric]:
        status = self.capture.status()
        yield GaugeMetricFamily("xdpfw_captures_running", "Packet captures streaming now",
                                value=status["running"])
        pk = CounterMetricFamily(
            "xdpfw_capture_packets", "Packets a capture selected: captured, refused by the "
            "rate limit, or lost to a full ring", labels=["outcome"])
        for outcome, c in status["kernel"].items():
            pk.add_metric([outcome], c["packets"])
        yield pk


def build_registry(firewall: Firewall, dataplane: Dataplane,
                   events: EventStats | None = None, series: RuleSeries | None = None,
                   capture: CaptureStats | None = None) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FirewallCollector(firewall, dataplane, events, series, capture))
    # The daemon's own process: CPU, memory, open files, Python's GC.
    for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
        registry.register(collector)
    return registry
