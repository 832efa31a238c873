"""Each node's status in etcd, under a lease of its own: a node that stops (or is cut off)
vanishes from the list once its lease runs out, without anyone cleaning up after it."""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable

from xdpfw.fleet.etcd import Etcd, EtcdError, EtcdUnavailable
from xdpfw.fleet.layout import Keys
from xdpfw.fleet.sync import NodeState, SyncEngine

log = logging.getLogger(__name__)

PUBLISH_S = 2.0  # and at once after each apply


def node_status(node: str, state: NodeState, rules: int, services: int | None) -> dict:
    """services: None on a node without a load balancer."""
    return {"node": node, "applied_revision": state.applied, "rules": rules,
            "services": services,
            "health": state.health, "last_error": state.last_error,
            "last_error_at": state.last_error_at, "refused_keys": state.refused_count,
            "refused": state.refused, "resyncs": state.resyncs, "updated": time.time()}


class StatusPublisher:
    def __init__(self, etcd: Etcd, keys: Keys, node: str, engine: SyncEngine,
                 rule_count: Callable[[], int], service_count: Callable[[], int | None],
                 ttl_s: int) -> None:
        self.etcd, self.keys, self.node, self.engine = etcd, keys, node, engine
        self.rule_count, self.service_count, self.ttl_s = rule_count, service_count, ttl_s
        self.lease = 0
        self.reachable: bool | None = None
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="xdpfw-fleet-status",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        with self.engine.changed:
            self.engine.changed.notify_all()
        self._thread.join(timeout=10)
        if self.lease:  # gone from the list at once, not a TTL later
            with contextlib.suppress(EtcdUnavailable, EtcdError):
                self.etcd.revoke(self.lease)

    def status(self) -> dict:
        return node_status(self.node, self.engine.state, self.rule_count(),
                           self.service_count())

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._publish()
                self.reachable, self.error = True, None
            except (EtcdUnavailable, EtcdError) as e:
                self.reachable, self.error = False, str(e)
            with self.engine.changed:  # woken early by an apply, so lag shows at once
                self.engine.changed.wait(PUBLISH_S)

    def _publish(self) -> None:
        if not self.lease or not self.etcd.keepalive(self.lease):
            self.lease = self.etcd.grant(self.ttl_s)
        value = json.dumps(self.status(), separators=(",", ":")).encode()
        self.etcd.put(self.keys.node(self.node), value, lease=self.lease)


def fleet_view(etcd: Etcd, keys: Keys, me: dict) -> dict:
    """Every node's status and lag behind the fleet's last change; when etcd is away, this
    node's own status and why."""
    try:
        _, kvs = etcd.get_prefix(keys.nodes)
        _, ids = etcd.get(keys.ids)
    except (EtcdUnavailable, EtcdError) as e:
        return {"etcd": {"reachable": False, "error": str(e)}, "revision": None,
                "nodes": [{**me, "lag": None}]}
    nodes = []
    for kv in kvs:
        try:
            status = json.loads(kv.value)
            if not isinstance(status, dict):
                raise ValueError
        except ValueError:
            status = {"node": kv.key[len(keys.nodes):].decode(errors="replace"),
                      "health": "unreadable status"}
        nodes.append(status)
    if me["node"] not in {n.get("node") for n in nodes}:
        nodes.append(me)  # not published yet
    for n in nodes:
        if n.get("node") == me["node"]:
            n.update(me)  # fresher than what it last published
    revision = ids.mod_revision if ids else 0
    for n in nodes:
        applied = n.get("applied_revision")
        n["lag"] = max(0, revision - applied) if isinstance(applied, int) else None
    nodes.sort(key=lambda n: str(n.get("node")))
    return {"etcd": {"reachable": True, "error": None}, "revision": revision, "nodes": nodes}
