"""`Fleet`: what the daemon starts and the API calls when [fleet] is configured."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

from xdpfw.config import FleetConfig
from xdpfw.errors import ConflictError, FleetUnavailableError
from xdpfw.fleet.cache import FleetCache
from xdpfw.fleet.etcd import Etcd, Tls
from xdpfw.fleet.layout import Keys
from xdpfw.fleet.lb_sync import ServiceApplier
from xdpfw.fleet.lb_writer import ServiceWriter
from xdpfw.fleet.set_writer import SetWriter
from xdpfw.fleet.status import StatusPublisher, fleet_view
from xdpfw.fleet.sync import SyncEngine
from xdpfw.fleet.writer import FleetWriter, check_txn_size
from xdpfw.lb.model import BackendSpec, ServiceSpec, check_service
from xdpfw.lb.service import LoadBalancer
from xdpfw.rules.document import RuleDocument
from xdpfw.rules.kind import RuleKind
from xdpfw.rules.model import Action, Rule
from xdpfw.rules.table import Prefixes
from xdpfw.service import Firewall, RuleSpec
from xdpfw.statedir import store_path

log = logging.getLogger(__name__)

# A write answers once etcd has committed it; it also waits this long for this node to have
# applied it, so a client reads its own write from the node it wrote through.
OWN_APPLY_WAIT_S = 2.0
SET_APPLY_WAIT_S = 30.0  # a set of a million takes seconds to apply
SERVICE_APPLY_WAIT_S = 10.0  # resolving the MACs of new backends takes up to seconds


class Fleet:
    def __init__(self, cfg: FleetConfig, fw: Firewall, state_dir: Path | str,
                 lb: LoadBalancer | None = None) -> None:
        """lb: this node's load balancer; its services are the fleet's (data/services/)."""
        self.cfg, self.fw, self.lb = cfg, fw, lb
        self.etcd = Etcd(cfg.etcd, timeout_s=cfg.timeout_s,
                         tls=Tls(cfg.ca_file, cfg.cert_file, cfg.key_file),
                         username=cfg.username, password=cfg.effective_password())
        self.keys = Keys.under(cfg.prefix)
        self.cache = FleetCache(store_path(state_dir))
        self.engine = SyncEngine(fw, self.etcd, self.keys, self.cache,
                                 ServiceApplier(lb, self.keys) if lb is not None else None)
        self.writer = FleetWriter(self.etcd, self.keys)
        self.service_writer = ServiceWriter(self.etcd, self.keys, self.writer)
        self.set_writer = SetWriter(self.etcd, self.keys, self.writer, fw)
        self.publisher = StatusPublisher(
            self.etcd, self.keys, cfg.node, self.engine, lambda: fw.counts().rules,
            lambda: len(lb.list_services()) if lb is not None else None, cfg.status_ttl_s)

    def start(self) -> None:
        self.engine.start()
        self.publisher.start()
        log.info("fleet: node %s, etcd %s, prefix %s; enforcing %d rules of revision %d",
                 self.cfg.node, ", ".join(self.cfg.etcd), self.cfg.prefix,
                 self.fw.counts().rules, self.engine.state.applied)

    def close(self) -> None:
        self.publisher.stop()
        self.engine.stop()
        self.etcd.close()
        self.cache.close()

    # -- writes (REST) --------------------------------------------------------------------

    def add_rules(self, specs: Sequence[RuleSpec]) -> list[Rule]:
        for s in specs:
            if s.rule_set:
                raise ConflictError(
                    f"a rule of set {s.rule_set}: on a fleet node a set is the fleet's, "
                    f"replaced whole through PUT /api/v1/fleet/sets/{s.rule_set}")
        with self._refused_while_away():
            ids, revision = self.writer.add_rules(specs)
        self.engine.wait_applied(revision, OWN_APPLY_WAIT_S)
        return [Rule(i, s.prefix, s.action, s.proto, s.dport, s.comment)
                for i, s in zip(ids, specs, strict=True)]

    def add_document(self, doc: RuleDocument, skip_existing: bool = False) -> list[int]:
        """POST /api/v1/rules/bulk on a fleet node: rules in no set, in one etcd transaction
        (add_rules). What etcd's rules cannot say is refused, never written only here."""
        if skip_existing:
            raise ConflictError(
                "skip_existing is not offered on a fleet node (a fleet write is one guarded "
                "etcd transaction): send only the new rules, or a whole set to PUT "
                "/api/v1/fleet/sets/{name}")
        check_txn_size(len(doc))
        return [r.id for r in self.add_rules(_specs(doc))]

    def delete_rule(self, rule_id: int) -> Rule:
        rule = self.fw.get_rule(rule_id)
        for name, m in list(self.engine.sets.items()):
            if any(rule_id in e.ids for e in m.entries):
                raise ConflictError(f"rule {rule_id} belongs to fleet set {name}: replace the "
                                    f"set without it (PUT /api/v1/fleet/sets/{name})")
        with self._refused_while_away():
            revision = self.writer.delete_rule(rule)
        self.engine.wait_applied(revision, OWN_APPLY_WAIT_S)
        return rule

    def replace_set(self, name: str, prefixes: Prefixes, action: Action, comment: str,
                    wait_s: float = SET_APPLY_WAIT_S) -> dict:
        with self._refused_while_away():
            result = self.set_writer.replace(name, prefixes, action, comment)
        result["applied_here"] = self.engine.wait_applied(result["revision"], wait_s)
        return result

    def set_of(self, name: str, doc: RuleDocument) -> tuple[Prefixes, RuleKind]:
        """PUT /api/v1/sets/{name} on a fleet node: the body as fleet set `name` (its
        prefixes and their one kind), or 409 saying why a fleet set cannot hold it."""
        doc.check_set(name)
        sections = [s for s in doc.sections if len(s.prefixes)]
        narrow = next((s.kind for s in sections if s.kind.proto or s.kind.dport), None)
        kinds = {(s.kind.action, s.kind.comment) for s in sections}
        why = None
        if narrow is not None:  # a port needs a protocol (check_match)
            match = narrow.proto.value + (f"/{narrow.dport}" if narrow.dport else "")
            why = f"these rules narrow by protocol ({match})"
        elif len(kinds) > 1:
            why = f"these rules have {len(kinds)} different actions or comments"
        if why is not None:
            raise ConflictError(
                f"on a fleet node set {name} is the fleet's, and a fleet set is prefixes "
                f"under one action and comment, any protocol: {why}. Send such a body here "
                f"or to PUT /api/v1/fleet/sets/{name}; a rule with a protocol or port goes "
                "alone, in no set, through POST /api/v1/rules")
        return Prefixes.concat([s.prefixes for s in sections]), sections[0].kind

    def delete_set(self, name: str) -> dict:
        with self._refused_while_away():
            revision = self.set_writer.delete(name)
        return {"name": name, "revision": revision,
                "applied_here": self.engine.wait_applied(revision, SET_APPLY_WAIT_S)}

    def list_sets(self) -> list[dict]:
        """etcd's sets; while it is away, the sets as this node applied them."""
        try:
            return self.set_writer.list()
        except FleetUnavailableError:
            return [{"name": n, "count": m.count, "chunks": len(m.entries),
                     "action": m.action.value, "comment": m.comment, "revision": None}
                    for n, m in self.engine.sets.items()]

    # -- load-balancer services (REST writes; the views are this node's, once applied) ---

    def create_service(self, spec: ServiceSpec) -> tuple[int, bool]:
        """Returns (the service's fleet-wide id, whether this node applied it in time)."""
        if self.lb is not None:
            check_service(spec, self.lb.registry.max_cpus)
        with self._refused_while_away():
            svc, revision = self.service_writer.create(spec)
        return svc.id, self.engine.wait_applied(revision, SERVICE_APPLY_WAIT_S)

    def delete_service(self, service_id: int) -> bool:
        with self._refused_while_away():
            _, revision = self.service_writer.delete(service_id)
        return self.engine.wait_applied(revision, SERVICE_APPLY_WAIT_S)

    def add_backend(self, service_id: int, spec: BackendSpec) -> tuple[int, bool]:
        """Returns (the backend's fleet-wide id, whether this node applied it in time)."""
        with self._refused_while_away():
            svc, revision = self.service_writer.add_backend(service_id, spec)
        return svc.ids.backends[-1], self.engine.wait_applied(revision, SERVICE_APPLY_WAIT_S)

    def update_backend(self, service_id: int, backend_id: int, weight: int | None,
                       state: str | None) -> bool:
        with self._refused_while_away():
            _, revision = self.service_writer.update_backend(service_id, backend_id, weight,
                                                             state)
        return self.engine.wait_applied(revision, SERVICE_APPLY_WAIT_S)

    def delete_backend(self, service_id: int, backend_id: int) -> bool:
        with self._refused_while_away():
            _, revision = self.service_writer.delete_backend(service_id, backend_id)
        return self.engine.wait_applied(revision, SERVICE_APPLY_WAIT_S)

    @contextlib.contextmanager
    def _refused_while_away(self) -> Iterator[None]:
        """"etcd unreachable" as the 503 a client can act on."""
        try:
            yield
        except FleetUnavailableError as e:
            raise FleetUnavailableError(
                f"etcd is unreachable, so this fleet node refuses writes until it is back "
                f"({e}); it keeps enforcing the rules and services it applied last "
                f"({self.fw.counts().rules} rules, revision {self.engine.state.applied})") from e

    # -- reads ----------------------------------------------------------------------------

    def view(self) -> dict:
        return {"node": self.cfg.node, "prefix": self.cfg.prefix,
                **fleet_view(self.etcd, self.keys, self.publisher.status())}



def _specs(doc: RuleDocument) -> list[RuleSpec]:
    """A document's rules one by one, in the request's order when it had one (ids are given
    in that order)."""
    specs, where = [], []
    for sec in doc.sections:
        k = sec.kind
        specs += [RuleSpec(sec.prefixes.prefix(i), k.action, k.proto, k.dport, k.comment,
                           k.set) for i in range(len(sec.prefixes))]
        if sec.positions is not None:
            where += sec.positions.tolist()
    if len(where) == len(specs):
        specs = [s for _, s in sorted(zip(where, specs, strict=True), key=lambda p: p[0])]
    return specs
