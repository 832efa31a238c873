"""`Fleet`: what the daemon starts and the API calls when [fleet] is configured."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

from xdpfw.config import FleetConfig
from xdpfw.errors import FleetUnavailableError
from xdpfw.fleet.cache import FleetCache
from xdpfw.fleet.etcd import Etcd, Tls
from xdpfw.fleet.layout import Keys
from xdpfw.fleet.status import StatusPublisher, fleet_view
from xdpfw.fleet.sync import SyncEngine
from xdpfw.fleet.writer import FleetWriter
from xdpfw.rules.model import Rule
from xdpfw.service import Firewall, RuleSpec
from xdpfw.statedir import store_path

log = logging.getLogger(__name__)

# A write answers once etcd has committed it; it also waits this long for this node to have
# applied it, so a client reads its own write from the node it wrote through.
OWN_APPLY_WAIT_S = 2.0


class Fleet:
    def __init__(self, cfg: FleetConfig, fw: Firewall, state_dir: Path | str) -> None:
        self.cfg, self.fw = cfg, fw
        self.etcd = Etcd(cfg.etcd, timeout_s=cfg.timeout_s,
                         tls=Tls(cfg.ca_file, cfg.cert_file, cfg.key_file),
                         username=cfg.username, password=cfg.effective_password())
        self.keys = Keys.under(cfg.prefix)
        self.cache = FleetCache(store_path(state_dir))
        self.engine = SyncEngine(fw, self.etcd, self.keys, self.cache)
        self.writer = FleetWriter(self.etcd, self.keys)
        self.publisher = StatusPublisher(self.etcd, self.keys, cfg.node, self.engine,
                                         lambda: fw.counts().rules, cfg.status_ttl_s)

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
        with self._refused_while_away():
            ids, revision = self.writer.add_rules(specs)
        self.engine.wait_applied(revision, OWN_APPLY_WAIT_S)
        return [Rule(i, s.prefix, s.action, s.proto, s.dport, s.comment)
                for i, s in zip(ids, specs, strict=True)]

    def delete_rule(self, rule_id: int) -> Rule:
        rule = self.fw.get_rule(rule_id)
        with self._refused_while_away():
            revision = self.writer.delete_rule(rule)
        self.engine.wait_applied(revision, OWN_APPLY_WAIT_S)
        return rule

    @contextlib.contextmanager
    def _refused_while_away(self) -> Iterator[None]:
        """"etcd unreachable" as the 503 a client can act on."""
        try:
            yield
        except FleetUnavailableError as e:
            raise FleetUnavailableError(
                f"etcd is unreachable, so this fleet node refuses writes until it is back "
                f"({e}); it keeps enforcing the {self.fw.counts().rules} rules it applied "
                f"last (revision {self.engine.state.applied})") from e

    # -- reads ----------------------------------------------------------------------------

    def view(self) -> dict:
        return {"node": self.cfg.node, "prefix": self.cfg.prefix,
                **fleet_view(self.etcd, self.keys, self.publisher.status())}

