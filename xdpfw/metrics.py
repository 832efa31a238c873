"""Prometheus metrics, read from the kernel's maps at scrape time (nothing is cached).

Every app gets its own CollectorRegistry (no import-time global), so tests and the daemon each
wire their own; other parts of the appliance (the load balancer) register their collectors on
`app.state.metrics`.

Per-rule series are exported for rules that have matched at least once: a blocklist of a
million prefixes would otherwise be a million series of zeros.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from xdpfw.dataplane import abi
from xdpfw.dataplane.dataplane import Dataplane
from xdpfw.rules.model import Action
from xdpfw.service import Firewall

# The XDP action of each reason: a forwarded or dropped packet is never labelled "pass".
VERDICT_OF_REASON = {abi.REASON_NAMES[r]: v for r, v in abi.REASON_VERDICTS.items()}


class EventStats(Protocol):
    def metrics(self) -> dict[str, int]: ...


class FirewallCollector(Collector):
    """Counters from the Dataplane's maps, named by the Firewall's read views."""

    def __init__(self, firewall: Firewall, dataplane: Dataplane,
                 events: EventStats | None = None) -> None:
        self.fw = firewall
        self.dp = dataplane
        self.events = events

    def collect(self) -> Iterator[Metric]:
        yield from self._program()
        yield from self._verdicts()
        yield from self._interfaces()
        yield from self._rules()
        yield from self._maps()
        if self.events is not None:
            yield from self._events()

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
        pk = CounterMetricFamily("xdpfw_rule_packets", "Packets decided by each rule (rules "
                                 "that matched at least once)", labels=labels)
        by = CounterMetricFamily("xdpfw_rule_bytes", "Bytes decided by each rule", labels=labels)
        count = GaugeMetricFamily("xdpfw_rules", "Rules configured", labels=["action"])
        for r, p, b in self.fw.rule_counters():
            lv = [str(r.id), str(r.prefix), r.action.value]
            pk.add_metric(lv, p)
            by.add_metric(lv, b)
        actions = self.fw.rules_by_action()
        for action in (Action.DROP, Action.PASS):
            count.add_metric([action.value], actions.get(action, 0))
        yield pk
        yield by
        yield count

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


def build_registry(firewall: Firewall, dataplane: Dataplane,
                   events: EventStats | None = None) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FirewallCollector(firewall, dataplane, events))
    return registry
