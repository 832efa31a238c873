"""`xdpfw serve`: load the data plane, restore state, attach, and serve the REST API.

The order matters: the state directory's lock comes first, so a second daemon on the same
state leaves everything as it found it (xdpfw/statedir.py). One Dataplane is loaded and given
to the firewall, the load balancer, the event reader and (through the firewall) the metrics.
SIGTERM and SIGINT stop the control plane with exit status 0, and remove the socket and the
pid file; the data plane keeps guarding.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import resource
import shutil
import signal
import socket
import stat
import threading
from dataclasses import dataclass
from pathlib import Path

from xdpfw import demo, heap, logfilter, sdnotify, statedir
from xdpfw.api.app import create_app
from xdpfw.api.metrics_app import create_metrics_app
from xdpfw.api.middleware import BodyLimits
from xdpfw.capture import CaptureHub, RateLimit
from xdpfw.clients import per_client_cap
from xdpfw.config import AppConfig, ConfigError, RuleConfig
from xdpfw.dataplane.dataplane import Dataplane
from xdpfw.dataplane.loader import ProgramConfig
from xdpfw.declared import declared_rules
from xdpfw.events import EventHub
from xdpfw.httpserver import ApiServers, GuardCollector, TcpLimits
from xdpfw.lb.service import LoadBalancer
from xdpfw.metrics import RuleSeries
from xdpfw.proxy.limits import DEFAULT_MAX_CONNECTIONS, MiB, ProxyLimits
from xdpfw.service import Firewall

log = logging.getLogger("xdpfw")


@dataclass
class ServeOptions:
    config: AppConfig
    demo: bool = False
    log_level: str = "info"
    adopt_pins: bool = False  # see Firewall: pins another store claimed are made equal to ours
    config_path: str | None = None  # the file `config` came from (reloaded by xdpfw reload)


def program_config(cfg: AppConfig) -> ProgramConfig:
    return ProgramConfig(
        pin_dir=cfg.state.bpffs_dir,
        max_rules=cfg.limits.max_rules,
        max_port_rules=cfg.limits.max_port_rules,
        max_tbl8_groups=cfg.limits.max_tbl8_groups,
        max_ifaces=cfg.limits.max_ifaces,
        max_services=cfg.lb.max_services,
        max_backends=cfg.lb.max_backends,
        lb_table_size=cfg.lb.table_size,
        lb_ct_size=cfg.lb.conntrack_size,
        lb_ct_timeout_s=cfg.lb.conntrack_timeout_s,
    )


FD_RESERVE = 256  # descriptors kept for maps, programs, the store and the unix socket


class _StopRequested(BaseException):
    """SIGTERM/SIGINT during start-up (a BaseException: `except Exception` must not eat it)."""


def unix_listener(path: str) -> socket.socket:
    """Called only under the state directory's lock."""
    p = Path(path)
    if not p.parent.exists():
        p.parent.mkdir(parents=True)
        os.chmod(p.parent, 0o755)  # the socket's group must reach it (the umask is 077)
    if p.exists() and stat.S_ISSOCK(p.stat().st_mode):
        if _answers(path):  # a daemon on another state directory: not ours to take
            raise ConfigError(f"another server is listening on {path}: choose another socket")
        p.unlink()  # left by a previous run
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    os.chmod(path, 0o660)  # root and the socket's group only: no token on this path
    return sock


def _answers(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except OSError as e:
            if e.errno in (errno.ECONNREFUSED, errno.ENOENT):
                return False
            raise
        return True


def tcp_listener(addr: str) -> socket.socket:
    host, _, port = addr.rpartition(":")
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, int(port)))
    return sock


def raise_fd_limit() -> int:
    """The soft RLIMIT_NOFILE up to the hard one (root cannot always raise the hard one)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = int(Path("/proc/sys/fs/nr_open").read_text())
    if soft == resource.RLIM_INFINITY or soft >= hard:
        return soft
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def tcp_limits(cfg: AppConfig, fd_limit: int) -> TcpLimits:
    cap = cfg.api.max_connections
    if cap > fd_limit - FD_RESERVE:
        cap = max(fd_limit - FD_RESERVE, 1)
        log.warning("api.max_connections %d is more than the open-file limit (%d) allows: "
                    "using %d", cfg.api.max_connections, fd_limit, cap)
    return TcpLimits(cap, cfg.api.header_timeout_s, cfg.api.idle_timeout_s,
                     per_client_cap(cfg.api.max_connections_per_client, cap))


def proxy_limits(cfg: AppConfig, fd_limit: int, api: TcpLimits) -> ProxyLimits:
    """[lb] proxy limits; proxied connections get the descriptors the API does not (two each),
    so that a flood of them at a VIP cannot take the API's."""
    room = max((fd_limit - FD_RESERVE - api.max_connections) // 2, 1)
    want = cfg.lb.proxy_max_connections
    if want is not None and want > room:
        log.warning("lb.proxy_max_connections %d is more than the open-file limit (%d) "
                    "allows: using %d", want, fd_limit, room)
    cap = min(want or DEFAULT_MAX_CONNECTIONS, room)
    return ProxyLimits(max_queued=cfg.lb.proxy_max_queued_mib * MiB,
                       max_queued_total=cfg.lb.proxy_max_queued_total_mib * MiB,
                       max_connections=cap, idle_timeout=cfg.lb.proxy_idle_timeout_s,
                       max_per_client=per_client_cap(
                           cfg.lb.proxy_max_connections_per_client, cap))


def pid_file(cfg: AppConfig) -> Path:
    return Path(cfg.state.dir) / "xdpfw.pid"


def rules_from_config(fw: Firewall, cfg: AppConfig, path: str | None) -> None:
    """[state] rules_from_config: make the store equal to the file's [[rules]] and [[sets]]
    (and keep the API from changing rules until the next start or reload)."""
    if path is None:
        raise ConfigError("[state] rules_from_config needs the rules in a config file: "
                          "start with --config FILE")
    report = fw.sync_config(declared_rules(cfg, path), path)
    fw.audit.record("config file (start-up)", f"rules from {path}",
                    f"{report.added} added, {report.removed} removed, {report.changed} "
                    f"changed, {report.kept} kept")


def seed_rules(fw: Firewall, rules: list[RuleConfig]) -> int:
    """Add the config file's rules that the store does not hold yet (same prefix, proto and
    port): rules changed through the API since are left as they are."""
    specs = [r.spec() for r in rules]
    specs = [s for s in specs if not fw.has_rule(s.prefix, s.proto, s.dport)]
    if specs:
        fw.add_rules(specs)
    return len(specs)


def remove_everything(fw: Firewall, pin_dir: str) -> None:
    """`xdpfw stop --detach`: no interface guarded, no pinned map left."""
    try:
        fw.detach_all()
    finally:
        shutil.rmtree(pin_dir, ignore_errors=True)  # a still-attached program keeps its maps
    log.info("detached every interface and removed the pins under %s", pin_dir)


def serve(opts: ServeOptions) -> None:
    cfg = opts.config
    state = Path(cfg.state.dir)
    lock = statedir.lock(state)  # first: a second daemon must touch nothing
    try:
        _serve(opts, state)
    except _StopRequested:
        log.info("stopped during start-up")
    finally:
        os.close(lock)


def _serve(opts: ServeOptions, state: Path) -> None:
    cfg = opts.config
    os.umask(0o077)  # what the daemon creates is root's alone unless it says otherwise
    statedir.secure(state)
    logfilter.install()
    if (cfg.api.listen or cfg.ui.listen) and not cfg.api.tokens_by_name():
        raise ConfigError(
            f"{'api' if cfg.api.listen else 'ui'}.listen opens the API over TCP, which needs "
            "a token: set api.token or XDPFW_API_TOKEN"
        )
    fd_limit = raise_fd_limit()
    api_limits = tcp_limits(cfg, fd_limit)
    heap.tune()
    dp = Dataplane(program_config(cfg))
    try:
        fw = Firewall(cfg.state.dir, dp, adopt_pins=opts.adopt_pins)
    except BaseException:
        dp.close()
        raise
    stop_request = {"detach": False}
    pid = pid_file(cfg)
    events: EventHub | None = None
    capture: CaptureHub | None = None
    lb = None
    fleet = None
    servers: ApiServers | None = None
    unix: socket.socket | None = None

    daemon_pid = os.getpid()

    def on_signal(signum: int, _frame) -> None:
        # A process forked from this one (pyroute2's namespace workers) inherits the handler;
        # it must not unwind the daemon's stack (closing its maps and store): it just exits.
        if os.getpid() != daemon_pid:
            os._exit(128 + signum)
        # uvicorn handles these while it serves, then puts this handler back and raises the
        # signal again: here that is harmless, and `serve` returns (exit status 0).
        if servers is None:
            raise _StopRequested(signum)
        servers.stop()

    try:
        # The pid namespace too: `xdpfw stop` on a container's host must not read this
        # number as one of its own processes.
        pid.write_text(f"{os.getpid()}\n{os.readlink('/proc/self/ns/pid')}\n")
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, on_signal)
        if cfg.state.rules_from_config:
            rules_from_config(fw, cfg, opts.config_path)
        elif added := seed_rules(fw, cfg.rules):
            log.info("added %d rules from the config file", added)
        for iface in cfg.interfaces:
            fw.attach_interface(**iface.model_dump())
        if opts.demo and not cfg.interfaces:
            ifname, ns = demo.build()
            fw.attach_interface(ifname, ns, policy="pass")
            print(demo.howto(cfg.api.socket), flush=True)
        events = EventHub(dp, fw)  # reads sampled drops; follows the program across upgrades
        events.start(cfg.events.sample_rate)
        capture = CaptureHub(dp, RateLimit(cfg.capture.rate, cfg.capture.burst))
        unix = unix_listener(cfg.api.socket)
        # The dashboard's listeners serve the same app behind the same token.
        tcp = [tcp_listener(a) for a in [*cfg.api.listen, *cfg.ui.listen]]
        metrics_sockets = [tcp_listener(cfg.metrics.listen)] if cfg.metrics.listen else []
        # The LB runs its health checks on a thread of its own, not in uvicorn's loop: probes
        # must leave from [lb].netns (a per-thread setting), and health changes do blocking
        # map writes and Maglev builds that must not stall the API (xdpfw/lb/watcher.py).
        lb = LoadBalancer(state, dp, cfg.lb.netns, proxy_mode=cfg.lb.proxy_mode,
                          proxy_limits=proxy_limits(cfg, fd_limit, api_limits))
        lb.start()
        if cfg.fleet is not None:  # rules and services from etcd, on a thread (fleet/sync.py)
            from xdpfw.fleet.service import Fleet

            fleet = Fleet(cfg.fleet, fw, state, lb)
            fleet.start()
        limits = BodyLimits(cfg.api.max_body_bytes, cfg.api.max_bulk_body_bytes)
        app = create_app(fw, cfg.api.tokens_by_name(), lb=lb, events=events, body_limits=limits,
                         capture=capture, config_path=opts.config_path,
                         rule_series=RuleSeries(cfg.metrics.top_rules, cfg.metrics.max_sets),
                         fleet=fleet)
        servers = ApiServers(app, unix, tcp, api_limits, opts.log_level,
                             create_metrics_app(app.state.metrics), metrics_sockets)
        app.state.metrics.register(GuardCollector(servers.guards))
        servers.before_shutdown.append(events.end_streams)
        servers.before_shutdown.append(capture.end_streams)

        def shutdown(detach: bool) -> None:
            stop_request["detach"] |= detach
            servers.stop()

        app.state.shutdown = shutdown
        heap.trim()  # what compiling the programs and restoring the rules left
        counts = fw.counts()
        log.info("xdpfw: %d rules, %d interfaces; API on %s%s", counts.rules,
                 counts.interfaces, ", ".join([cfg.api.socket, *cfg.api.listen, *cfg.ui.listen]),
                 f"; metrics on {cfg.metrics.listen}" if cfg.metrics.listen else "")
        serving_ended = threading.Event()  # no READY=1 after that
        sdnotify.ready_when_answering(cfg.api.socket, serving_ended)
        try:
            servers.run()
        finally:
            serving_ended.set()
    finally:
        sdnotify.notify("STOPPING=1")
        if fleet is not None:
            fleet.close()
        if events is not None:
            events.stop()
        if capture is not None:
            capture.stop()
        if lb is not None:
            lb.close()
        try:
            if stop_request["detach"]:
                remove_everything(fw, cfg.state.bpffs_dir)
        finally:
            # Without detach, the attached programs and pinned maps stay: the data plane goes
            # on filtering.
            fw.close()
            dp.close()
        if unix is not None:  # ours: bound by this process, under the lock
            with contextlib.suppress(FileNotFoundError):
                os.unlink(cfg.api.socket)
        with contextlib.suppress(FileNotFoundError):
            pid.unlink()
