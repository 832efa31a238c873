"""Prometheus metrics of the load balancer: per service and per backend, read from the kernel's
counters at scrape time (nothing is cached). create_app() registers LbCollector on the app's
registry when the appliance runs a load balancer.

Series are labelled by ids (stable across restarts and renames) plus the readable fields:
    xdpfw_service_packets_total{service, service_name, vip, port, proto, outcome}
        outcome: forwarded | no_backend (dropped: no usable backend)
    xdpfw_backend_packets_total{service, backend, address}
    xdpfw_backend_healthy / xdpfw_backend_in_table / xdpfw_backend_table_share
Services in forward mode `proxy` also have, from their engine's counters:
    xdpfw_proxy_connections_total{service, service_name, event}
        event: accepted | closed | backend_failures | relayed_in_userspace | queue_resets |
               idle_resets | limit_waits | client_refusals
    xdpfw_proxy_connections_active{service, service_name}
    xdpfw_proxy_bytes_total{service, service_name, direction, path}
        direction: to_backend | to_client; path: kernel (spliced) | userspace (relayed)
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

SERVICE_LABELS = ["service", "service_name", "vip", "port", "proto", "outcome"]
BACKEND_LABELS = ["service", "backend", "address"]
PROXY_LABELS = ["service", "service_name"]


class LbCollector(Collector):
    def __init__(self, lb) -> None:
        self.lb = lb  # xdpfw.lb.service.LoadBalancer

    def collect(self) -> Iterator[Metric]:
        svc_pk = CounterMetricFamily(
            "xdpfw_service_packets", "Packets to a service's VIP:port by outcome",
            labels=SERVICE_LABELS,
        )
        svc_by = CounterMetricFamily(
            "xdpfw_service_bytes", "Bytes to a service's VIP:port by outcome",
            labels=SERVICE_LABELS,
        )
        be_pk = CounterMetricFamily(
            "xdpfw_backend_packets", "Packets forwarded to a backend", labels=BACKEND_LABELS
        )
        be_by = CounterMetricFamily(
            "xdpfw_backend_bytes", "Bytes forwarded to a backend", labels=BACKEND_LABELS
        )
        healthy = GaugeMetricFamily(
            "xdpfw_backend_healthy",
            "1 when the backend passes its health checks (services without checks: 1)",
            labels=BACKEND_LABELS,
        )
        in_table = GaugeMetricFamily(
            "xdpfw_backend_in_table", "1 when the backend owns part of the Maglev table "
            "(active, weight > 0, MAC resolved, healthy)", labels=BACKEND_LABELS,
        )
        share = GaugeMetricFamily(
            "xdpfw_backend_table_share", "Fraction of its service's Maglev table the backend "
            "owns (its expected share of new flows)", labels=BACKEND_LABELS,
        )
        services = GaugeMetricFamily("xdpfw_services", "Load-balanced services configured")
        px_conns = CounterMetricFamily(
            "xdpfw_proxy_connections", "Proxied connections by event",
            labels=[*PROXY_LABELS, "event"],
        )
        px_active = GaugeMetricFamily(
            "xdpfw_proxy_connections_active", "Proxied connections open", labels=PROXY_LABELS
        )
        px_bytes = CounterMetricFamily(
            "xdpfw_proxy_bytes", "Bytes proxied, by direction and by the path they took",
            labels=[*PROXY_LABELS, "direction", "path"],
        )
        lb = self.lb
        with lb.lock:
            all_services = lb.list_services()
            services.add_metric([], len(all_services))
            for svc in all_services:
                r = svc.rec
                sid = str(r.id)
                for outcome, (p, b) in lb.counters(svc).items():
                    labels = [sid, r.name, r.vip, str(r.port), r.proto, outcome]
                    svc_pk.add_metric(labels, p)
                    svc_by.add_metric(labels, b)
                for be in svc.backends.values():
                    labels = [sid, str(be.rec.id), be.rec.address]
                    p, b = lb.backend_counters(be)
                    be_pk.add_metric(labels, p)
                    be_by.add_metric(labels, b)
                    healthy.add_metric(labels, int(be.healthy))
                    fraction = lb.share(svc, be)
                    in_table.add_metric(labels, int(fraction > 0))
                    share.add_metric(labels, fraction)
                counters = lb.proxy_status(svc).counters if r.forward == "proxy" else None
                if counters is not None:
                    labels = [sid, r.name]
                    for event, n in asdict(counters.connections).items():
                        if event == "active":
                            px_active.add_metric(labels, n)
                        else:
                            px_conns.add_metric([*labels, event], n)
                    k, u = counters.kernel, counters
                    for direction, path, n in (
                            ("to_backend", "kernel", k.bytes_to_backend),
                            ("to_client", "kernel", k.bytes_to_client),
                            ("to_backend", "userspace", u.userspace_bytes_to_backend),
                            ("to_client", "userspace", u.userspace_bytes_to_client)):
                        px_bytes.add_metric([*labels, direction, path], n)
        yield from (services, svc_pk, svc_by, be_pk, be_by, healthy, in_table, share,
                    px_conns, px_active, px_bytes)
