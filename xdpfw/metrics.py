"""Prometheus metrics, read from the kernel's maps at scrape time (nothing is cached).

Every app gets its own CollectorRegistry (no import-time global), so tests and the daemon each
wire their own; other parts of the appliance (the load balancer) register their collectors on
`app.state.metrics`.

Per-rule series are exported for rules that have matched at least once: a blocklist of a
million prefixes would otherwise be a million series of zeros.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Protocol

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from xdpfw.dataplane import abi
from xdpfw.dataplane.attach import link_info

log = logging.getLogger(__name__)

# The XDP action of each reason: a forwarded or dropped packet is never labelled "pass".
VERDICT_OF_REASON = {abi.REASON_NAMES[r]: v for r, v in abi.REASON_VERDICTS.items()}


class EventStats(Protocol):
    def metrics(self) -> dict[str, int]: ...


class FirewallCollector(Collector):
    def __init__(self, firewall, events: EventStats | None = None) -> None:
        self.fw = firewall
        self.events = events

    def collect(self) -> Iterator[Metric]:
        fw = self.fw
        with fw.lock:
            yield from self._program()
            yield from self._verdicts()
            yield from self._interfaces()
            yield from self._rules()
            yield from self._maps()
        if self.events is not None:
            yield from self._events()

    def _program(self) -> Iterator[Metric]:
        info = self.fw.program_info()
        loaded = GaugeMetricFamily(
            "xdpfw_program_loaded", "1 when the XDP program is loaded (value: its id in labels)",
            labels=["prog_id", "tag", "source"],
        )
        loaded.add_metric([str(info.id), info.tag, self.fw.program.config.source.name], 1)
        yield loaded

    def _verdicts(self) -> Iterator[Metric]:
        pk = CounterMetricFamily(
            "xdpfw_packets", "Packets by verdict and reason (every packet counted once)",
            labels=["verdict", "reason"],
        )
        by = CounterMetricFamily(
            "xdpfw_bytes", "Bytes by verdict and reason", labels=["verdict", "reason"]
        )
        for reason, (p, b) in self.fw.maps.reason_totals().items():
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
        for att in self.fw.attachments.values():
            name, netns = att.record.name, att.record.netns or ""
            for verdict, (p, b) in self.fw.maps.iface_totals(att.record.slot).items():
                pk.add_metric([name, netns, verdict], p)
                by.add_metric([name, netns, verdict], b)
            try:
                _, mode, attached_id, _ = link_info(att.record.name, att.record.netns)
            except Exception as e:  # the link vanished: report it as not guarded
                log.debug("link_info(%s): %s", name, e)
                mode, attached_id = None, None
            ours = self.fw.dp.instance_id(att.record.slot)
            attached.add_metric(
                [name, netns, str(mode or att.mode_in_use)], int(attached_id == ours)
            )
        yield pk
        yield by
        yield attached

    def _rules(self) -> Iterator[Metric]:
        fw = self.fw
        labels = ["rule_id", "prefix", "action"]
        pk = CounterMetricFamily("xdpfw_rule_packets", "Packets decided by each rule (rules "
                                 "that matched at least once)", labels=labels)
        by = CounterMetricFamily("xdpfw_rule_bytes", "Bytes decided by each rule", labels=labels)
        count = GaugeMetricFamily("xdpfw_rules", "Rules configured", labels=["action"])
        by_slot = {r.slot: r for r in fw.rules.values()}
        for slot, p, b in fw.maps.matched_rule_counters(fw.rule_slots.high):
            r = by_slot.get(slot)
            if r is None:
                continue
            lv = [str(r.id), str(r.prefix), r.action.value]
            pk.add_metric(lv, p)
            by.add_metric(lv, b)
        actions: dict[str, int] = {}
        for r in fw.rules.values():
            actions[r.action.value] = actions.get(r.action.value, 0) + 1
        for action in ("drop", "pass"):
            count.add_metric([action], actions.get(action, 0))
        yield pk
        yield by
        yield count

    def _maps(self) -> Iterator[Metric]:
        fw, cfg = self.fw, self.fw.config
        v4 = len(fw.maps.v4)
        occupancy = {
            "v4_verdicts": (v4, cfg.max_rules),
            "rules_v6": (len(fw.index.prefix_values) - v4, cfg.max_rules),
            "port_rules": (fw.index.port_entry_count, cfg.max_port_rules),
            "iface_config": (len(fw.attachments), cfg.max_ifaces),
            "rule_counters": (len(fw.rules), cfg.max_rules),
        }
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


def build_registry(firewall, events: EventStats | None = None) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FirewallCollector(firewall, events))
    return registry
