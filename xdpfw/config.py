"""The appliance's configuration: a TOML file, overridden by command-line flags.

    [api]
    socket = "/run/xdpfw/api.sock"   # always served; local clients need no token
    listen = ["127.0.0.1:8080"]      # optional TCP; then a bearer token is required
    token = "..."                    # or the XDPFW_API_TOKEN environment variable

    [state]
    dir = "/var/lib/xdpfw"
    bpffs_dir = "/sys/fs/bpf/xdpfw"

    [limits]
    max_rules = 2097152

    [[interfaces]]
    name = "eth1"
    netns = "edge"                   # optional
    mode = "auto"                    # auto | native | generic | offload
    policy = "pass"                  # pass | drop: packets no rule decides
    unparsed_policy = "pass"         # pass | drop: packets the parser cannot read
    guard_l2 = false                 # true: a drop policy drops ARP/ND too
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from xdpfw.dataplane.attach import Mode
from xdpfw.errors import XdpfwError

Policy = Literal["pass", "drop"]


class ConfigError(XdpfwError):
    pass


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ApiConfig(_Strict):
    socket: str = "/run/xdpfw/api.sock"
    listen: list[str] = Field(default_factory=list)
    token: str | None = None

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


class StateConfig(_Strict):
    dir: str = "/var/lib/xdpfw"
    bpffs_dir: str = "/sys/fs/bpf/xdpfw"


class LimitsConfig(_Strict):
    max_rules: int = Field(2_097_152, ge=16, le=1 << 26)
    max_port_rules: int = Field(65_536, ge=16, le=1 << 22)
    max_ifaces: int = Field(256, ge=2, le=4096)


class InterfaceConfig(_Strict):
    name: str = Field(min_length=1, max_length=15)
    netns: str | None = None
    mode: Mode = Mode.AUTO
    policy: Policy = "pass"
    unparsed_policy: Policy = "pass"
    guard_l2: bool = False


class AppConfig(_Strict):
    api: ApiConfig = Field(default_factory=ApiConfig)
    state: StateConfig = Field(default_factory=StateConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    interfaces: list[InterfaceConfig] = Field(default_factory=list)


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
        lines = [
            f"{path}: {'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors()
        ]
        raise ConfigError("\n".join(lines)) from None
