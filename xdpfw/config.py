"""The appliance's configuration: a TOML file, overridden by command-line flags.

    [api]
    socket = "/run/xdpfw/api.sock"   # always served; local clients need no token
    listen = ["127.0.0.1:8080"]      # optional TCP; then a bearer token is required
    token = "..."                    # or the XDPFW_API_TOKEN environment variable
    tokens = { ci = "...", fleet = "..." }  # more, by name: the audit trail names the client
    max_connections = 256            # TCP connections at once; more are closed unread
    max_connections_per_client = 64  # of those, one address (IPv6: a /64); 0: no cap
    header_timeout_s = 10            # a TCP request's headers must be in within this
    idle_timeout_s = 30              # a TCP client silent this long mid-request is cut off
    max_body_bytes = 1048576         # request bodies: 413 above this (1 MiB) ...
    max_bulk_body_bytes = 67108864   # ... and above this (64 MiB) for POST /api/v1/rules/bulk

    [state]
    dir = "/var/lib/xdpfw"
    bpffs_dir = "/sys/fs/bpf/xdpfw"
    rules_from_config = false        # true: [[rules]] and [[sets]] are all the rules (start-up
                                     # and `xdpfw reload` make the store equal to them)

    [limits]
    max_rules = 2097152

    [[interfaces]]
    name = "eth1"
    netns = "edge"                   # optional
    mode = "auto"                    # auto | native | generic | offload
    policy = "pass"                  # pass | drop: packets no rule decides
    unparsed_policy = "pass"         # pass | drop: packets the parser cannot read
    guard_l2 = false                 # true: a drop policy drops ARP/ND too

    [events]
    sample_rate = 100                # 1 in N dropped packets is sent to `xdpfw watch`; 0: off

    [capture]                        # `xdpfw capture`, GET /api/v1/capture
    rate = 10000                     # packets a second per CPU the kernel copies, at most ...
    burst = 2000                     # ... after this many back to back

    [metrics]
    listen = "127.0.0.1:9100"        # optional: /metrics alone, read-only, no token
    top_rules = 20                   # per-rule series: the rules with the most hits ...
    max_sets = 50                    # ... and per-set totals (a set: rules sharing a comment)

    [ui]
    listen = ["192.0.2.1:8443"]      # optional: the dashboard (/ui/) and the API, same token

    [fleet]                          # optional: rules live in etcd, shared by every node
    etcd = ["http://10.0.0.1:2379", "http://10.0.0.2:2379", "http://10.0.0.3:2379"]
    prefix = "/xdpfw/"               # the fleet's keys
    node = "edge-1"                  # this appliance's name in the fleet, unique
    ca_file = "/etc/xdpfw/etcd-ca.pem"    # optional, https endpoints
    cert_file = "/etc/xdpfw/etcd.pem"     # optional client certificate ...
    key_file = "/etc/xdpfw/etcd-key.pem"  # ... and key
    username = "xdpfw"               # optional etcd auth (password, or XDPFW_ETCD_PASSWORD)

    [[rules]]                        # ensured present at start (the API may add more)
    prefix = "203.0.113.0/24"
    action = "drop"                  # drop | pass
    proto = "tcp"                    # optional: tcp | udp | icmp
    dport = 22                       # optional, needs proto tcp or udp
    comment = "ssh scanners"
    set = "ssh"                      # optional: a named set

    [[sets]]                         # a named set: its prefixes here and/or in a file
    name = "spamhaus"
    file = "spamhaus-drop.txt"       # relative to this file's directory
    prefixes = ["192.0.2.0/24"]
    action = "drop"

`xdpfw check-config FILE` validates a file and names the line of each mistake.
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from xdpfw.api.schemas import RuleCreate
from xdpfw.dataplane.attach import Mode
from xdpfw.errors import RuleValidationError, XdpfwError
from xdpfw.rules.kind import RuleKind
from xdpfw.rules.model import check_set_name

Policy = Literal["pass", "drop"]


TOKEN_NAME = re.compile(r"[A-Za-z0-9_-]{1,32}")


class ConfigError(XdpfwError):
    pass


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ApiConfig(_Strict):
    socket: str = "/run/xdpfw/api.sock"
    listen: list[str] = Field(default_factory=list)
    token: str | None = None
    tokens: dict[str, str] = Field(default_factory=dict)  # more tokens, by name (audit)
    # TCP only, and before authentication: what one client without a token can hold.
    max_connections: int = Field(256, ge=1, le=65_536)
    # Of those, what one client address (an IPv6 /64) may hold. None: a quarter; 0: no cap.
    max_connections_per_client: int | None = Field(None, ge=0, le=65_536)
    header_timeout_s: float = Field(10.0, gt=0, le=3600)
    idle_timeout_s: float = Field(30.0, gt=0, le=86_400)
    # Both sockets. A 2M-prefix blocklist is ~33 MB of text: bulk endpoints take 64 MiB.
    max_body_bytes: int = Field(1 << 20, ge=1024, le=1 << 30)
    max_bulk_body_bytes: int = Field(64 << 20, ge=1024, le=1 << 32)

    @field_validator("listen")
    @classmethod
    def _host_port(cls, v: list[str]) -> list[str]:
        for item in v:
            host, _, port = item.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"listen address {item!r} must be HOST:PORT")
        return v

    def effective_token(self) -> str | None:
        return self.token or os.environ.get("XDPFW_API_TOKEN") or None

    def tokens_by_name(self) -> dict[str, str]:
        """Every token a TCP client may show, by the name the audit trail gives it: `token`
        (or XDPFW_API_TOKEN) is "default"."""
        lone = self.effective_token()
        return ({"default": lone} if lone else {}) | self.tokens

    @field_validator("tokens")
    @classmethod
    def _named(cls, v: dict[str, str]) -> dict[str, str]:
        for name, value in v.items():
            if not TOKEN_NAME.fullmatch(name):
                raise ValueError(f"token name {name[:40]!r}: 1-32 of A-Z a-z 0-9 _ -")
            if len(value) < 8:
                raise ValueError(f"token {name!r} is shorter than 8 characters")
        return v


class StateConfig(_Strict):
    dir: str = "/var/lib/xdpfw"
    bpffs_dir: str = "/sys/fs/bpf/xdpfw"
    # True: [[rules]] and [[sets]] are the rules, all of them (start-up and `xdpfw reload`
    # make the store equal to them, and the API changes none). False: [[rules]] only seed.
    rules_from_config: bool = False


class LimitsConfig(_Strict):
    # Per family. IPv4 verdict ids are 23 bits and twice max_rules are kept: 2^21 at most.
    max_rules: int = Field(2_097_152, ge=16, le=1 << 21)
    max_port_rules: int = Field(65_536, ge=16, le=1 << 22)
    max_tbl8_groups: int = Field(65_536, ge=16, le=1 << 22)  # 1 KiB of kernel memory each
    max_ifaces: int = Field(256, ge=2, le=4096)


class LbConfig(_Strict):
    """[lb]: the L4 load balancer (services themselves come through the API)."""

    netns: str | None = None  # where the backends are reached: MACs, routes, health probes
    table_size: int = Field(65_537, ge=7)  # Maglev table per service, a prime
    max_services: int = Field(64, ge=1, le=4096)
    max_backends: int = Field(4096, ge=1, le=1 << 20)
    conntrack_size: int = Field(262_144, ge=1024, le=1 << 26)
    conntrack_timeout_s: int = Field(300, ge=1)
    # Proxy services: splice in the kernel (sockhash), relay in user space, or try the kernel
    # first and fall back with a log line (auto).
    proxy_mode: Literal["auto", "sockhash", "userspace"] = "auto"
    # A spliced connection whose receiving peer falls this far behind its sender is reset: the
    # kernel would otherwise queue its bytes without limit (xdpfw/proxy/engine.py).
    proxy_max_queued_mib: int = Field(64, ge=1, le=65_536)
    # Over all spliced connections: past it the window clamp comes sooner, and a second later
    # connections holding more than their share of it are reset.
    proxy_max_queued_total_mib: int = Field(1024, ge=1, le=1 << 20)
    # Proxied connections at once over all proxy services (two descriptors each). None: as
    # many as the open-file limit leaves after the API's share, at most 32768.
    proxy_max_connections: int | None = Field(None, ge=1, le=32_768)
    # Of those, what one client address (an IPv6 /64) may hold; its connections past it are
    # reset as they are accepted. None: a quarter of proxy_max_connections; 0: no cap.
    proxy_max_connections_per_client: int | None = Field(None, ge=0, le=32_768)
    # A proxied connection with no byte either way for this long is reset (0: never).
    proxy_idle_timeout_s: int = Field(300, ge=0, le=7 * 86_400)

    @field_validator("table_size")
    @classmethod
    def _prime(cls, v: int) -> int:
        from xdpfw.lb.maglev import is_prime

        if not is_prime(v):
            raise ValueError(f"table_size must be a prime (e.g. 65537), got {v}")
        return v


class InterfaceConfig(_Strict):
    name: str = Field(min_length=1, max_length=15)
    netns: str | None = None
    mode: Mode = Mode.AUTO
    policy: Policy = "pass"
    unparsed_policy: Policy = "pass"
    guard_l2: bool = False


class EventsConfig(_Strict):
    # A flood must not overload the reader: by default 1 drop in 100 becomes an event.
    sample_rate: int = Field(100, ge=0, le=1 << 30)


def _host_port(item: str) -> str:
    host, _, port = item.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"listen address {item!r} must be HOST:PORT")
    return item


class CaptureConfig(_Strict):
    # A flood under capture costs the box at most this copy rate (per CPU), whatever the
    # client asks for.
    rate: int = Field(10_000, ge=1, le=1_000_000)
    burst: int = Field(2_000, ge=1, le=1_000_000)


class MetricsConfig(_Strict):
    listen: str | None = None  # HOST:PORT serving /metrics only: read-only, no token
    top_rules: int = Field(20, ge=0, le=10_000)
    max_sets: int = Field(50, ge=0, le=10_000)

    @field_validator("listen")
    @classmethod
    def _addr(cls, v: str | None) -> str | None:
        return None if v is None else _host_port(v)


class UiConfig(_Strict):
    listen: list[str] = Field(default_factory=list)  # the dashboard and the API, same token

    @field_validator("listen")
    @classmethod
    def _addrs(cls, v: list[str]) -> list[str]:
        return [_host_port(item) for item in v]


class FleetConfig(_Strict):
    """[fleet]: rules live in etcd, shared by every appliance configured with this prefix."""

    etcd: list[str] = Field(min_length=1)  # client URLs of the members, http:// or https://
    prefix: str = "/xdpfw/"  # every key of this fleet is under it
    node: str = Field(min_length=1, max_length=63, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    ca_file: str | None = None  # https: the CA that signed the members' certificates
    cert_file: str | None = None  # client certificate (etcd --client-cert-auth) ...
    key_file: str | None = None  # ... and its key
    username: str | None = None  # etcd auth; the password here or in XDPFW_ETCD_PASSWORD
    password: str | None = None
    timeout_s: float = Field(3.0, gt=0, le=60)  # one request to one member
    status_ttl_s: int = Field(10, ge=5, le=3600)  # a silent node leaves the list after this

    @field_validator("etcd")
    @classmethod
    def _urls(cls, v: list[str]) -> list[str]:
        for url in v:
            if not re.fullmatch(r"https?://[^/\s]+/?", url):
                raise ValueError(f"etcd endpoint {url!r} must be http(s)://HOST:PORT")
        return v

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        if not re.fullmatch(r"/[\x21-\x7e]*/", v):
            raise ValueError(f"prefix {v!r} must start and end with '/' (printable ASCII)")
        return v

    @model_validator(mode="after")
    def _pairs(self):
        if bool(self.cert_file) != bool(self.key_file):
            raise ValueError("cert_file and key_file go together")
        return self

    def effective_password(self) -> str | None:
        return self.password or os.environ.get("XDPFW_ETCD_PASSWORD") or None


# A [[rules]] entry is a POST /api/v1/rules body: one model validates both.
RuleConfig = RuleCreate


class SetConfig(RuleKind):
    """[[sets]]: a named set, its prefixes listed here and/or in a file (a blocklist, or an
    export's sections naming this set or none), relative to the config file's directory.
    action, proto, dport and comment apply to every prefix listed."""

    name: str = Field(min_length=1)
    prefixes: list[str] = Field(default_factory=list)
    file: str | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        try:
            return check_set_name(v)
        except RuleValidationError as e:
            raise ValueError(str(e)) from None

    @model_validator(mode="after")
    def _one_name(self):
        if self.set and self.set != self.name:
            raise ValueError(f"set {self.set!r} in [[sets]] {self.name!r}: leave it out")
        return self


class AppConfig(_Strict):
    api: ApiConfig = Field(default_factory=ApiConfig)
    state: StateConfig = Field(default_factory=StateConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    events: EventsConfig = Field(default_factory=EventsConfig)
    capture: CaptureConfig = Field(default_factory=CaptureConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    ui: UiConfig = Field(default_factory=UiConfig)
    lb: LbConfig = Field(default_factory=LbConfig)
    fleet: FleetConfig | None = None
    interfaces: list[InterfaceConfig] = Field(default_factory=list)
    rules: list[RuleConfig] = Field(default_factory=list)
    sets: list[SetConfig] = Field(default_factory=list)

    @model_validator(mode="after")
    def _sets_once(self):
        names = [s.name for s in self.sets]
        twice = {n for n in names if names.count(n) > 1}
        if twice:
            raise ValueError(f"[[sets]] {sorted(twice)[0]!r} is defined twice")
        return self

    @model_validator(mode="after")
    def _rules_in_one_place(self):
        if self.fleet is None:
            return self
        if self.rules or self.sets:
            raise ValueError(f"[[{'rules' if self.rules else 'sets'}]] cannot seed a fleet "
                             "node: with [fleet] the rules live in etcd (add them through the "
                             "API of any node; a set through PUT /api/v1/fleet/sets/{name})")
        if self.state.rules_from_config:
            raise ValueError("[state] rules_from_config cannot be on with [fleet]: the rules "
                             "live in etcd, and the file's would fight them at every sync")
        return self


def load_config(path: str | Path | None) -> AppConfig:
    if path is None:
        return AppConfig()
    try:
        data = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: {e}") from None
    try:
        return AppConfig.model_validate(data)
    except ValidationError as e:
        text = Path(path).read_text()
        raise ConfigError("\n".join(_located(path, text, err) for err in e.errors())) from None


def _located(path: str | Path, text: str, err) -> str:
    loc = tuple(err["loc"])
    line = line_of(text, loc)
    where = f"{path}:{line}" if line else str(path)
    field = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] not in ("missing", "value_error", "extra_forbidden"):
        msg += f" (got {err['input']!r})"
    return f"{where}: {field}: {msg}"


_HEADER = re.compile(r"\s*\[\[?\s*([\w.\-]+)\s*\]\]?")


def line_of(text: str, loc: tuple) -> int | None:
    """1-based line of a config item named by a pydantic error location such as
    ("interfaces", 1, "mode"): the key's line, else its table's header. tomllib keeps no
    positions, so this walks the usual layouts (tables, arrays of tables, key = value)."""
    lines = text.splitlines()
    start, end, found, table = 0, len(lines), None, ""
    i = 0
    while i < len(loc):
        key = str(loc[i])
        index = loc[i + 1] if i + 1 < len(loc) and isinstance(loc[i + 1], int) else None
        name = f"{table}.{key}" if table else key
        headers = [n for n in range(start, end)
                   if (m := _HEADER.match(lines[n])) and m.group(1) == name]
        if headers and (index is None or index < len(headers)):
            h = headers[index or 0]
            found, start, table = h + 1, h + 1, name
            end = next((n for n in range(start, end) if _HEADER.match(lines[n])), end)
            i += 2 if index is not None else 1
            continue
        assign = re.compile(rf"\s*{re.escape(key)}\s*=")
        hit = next((n for n in range(start, end) if assign.match(lines[n])), None)
        return hit + 1 if hit is not None else found
    return found


def check_config(path: str | Path, interfaces: bool = True) -> AppConfig:
    """load_config, then what only this box can tell: do the interfaces (and namespaces)
    exist? Every problem is reported with its line."""
    from xdpfw import netns as nsutil  # pyroute2: not needed to merely parse a config

    cfg = load_config(path)
    if not interfaces:
        return cfg
    text = Path(path).read_text()
    problems = []
    for n, iface in enumerate(cfg.interfaces):
        line = line_of(text, ("interfaces", n, "name"))
        where = f"{path}:{line}" if line else str(path)
        if iface.netns and iface.netns not in nsutil.list_netns():
            problems.append(f"{where}: interfaces[{n}]: no network namespace {iface.netns!r}")
            continue
        try:
            nsutil.ifindex(iface.netns, iface.name)
        except LookupError:
            ns = f"namespace {iface.netns}" if iface.netns else "the host namespace"
            problems.append(f"{where}: interfaces[{n}]: unknown interface {iface.name!r} in {ns}")
    if problems:
        raise ConfigError("\n".join(problems))
    return cfg
