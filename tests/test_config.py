"""The TOML config: defaults, overrides, and errors that name the key."""

from __future__ import annotations

import pytest

from xdpfw.config import ConfigError, load_config


def test_defaults_without_a_file():
    cfg = load_config(None)
    assert cfg.api.socket == "/run/xdpfw/api.sock" and cfg.api.listen == []
    assert cfg.limits.max_ifaces == 256 and cfg.lb.proxy_mode == "auto"


def test_proxy_mode_is_read_and_checked(tmp_path):
    good = tmp_path / "good.toml"
    good.write_text('[lb]\nproxy_mode = "userspace"\n')
    assert load_config(good).lb.proxy_mode == "userspace"
    bad = tmp_path / "bad.toml"
    bad.write_text('[lb]\nproxy_mode = "magic"\n')
    with pytest.raises(ConfigError) as e:
        load_config(bad)
    assert "lb.proxy_mode" in str(e.value), str(e.value)


def test_proxy_max_queued_is_read_and_checked(tmp_path):
    assert load_config(None).lb.proxy_max_queued_mib == 64
    good = tmp_path / "good.toml"
    good.write_text("[lb]\nproxy_max_queued_mib = 8\n")
    assert load_config(good).lb.proxy_max_queued_mib == 8
    bad = tmp_path / "bad.toml"
    bad.write_text("[lb]\nproxy_max_queued_mib = 0\n")
    with pytest.raises(ConfigError) as e:
        load_config(bad)
    assert "lb.proxy_max_queued_mib" in str(e.value), str(e.value)


def test_unknown_keys_are_refused(tmp_path):
    f = tmp_path / "typo.toml"
    f.write_text("[limits]\nmax_rule = 10\n")
    with pytest.raises(ConfigError) as e:
        load_config(f)
    assert "limits.max_rule" in str(e.value), str(e.value)
