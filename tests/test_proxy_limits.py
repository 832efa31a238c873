"""The proxy's shared budgets (xdpfw/proxy/limits.py) and how the daemon sizes them."""

from __future__ import annotations

import logging

import pytest

from xdpfw.config import ConfigError, load_config
from xdpfw.daemon import FD_RESERVE, proxy_limits, tcp_limits
from xdpfw.proxy.limits import (
    DEFAULT_MAX_CONNECTIONS,
    ConnectionBudget,
    MiB,
    Pressure,
    QueueBudget,
)


def test_connection_budget_refuses_at_its_limit_and_takes_again_after_a_give():
    b = ConnectionBudget(2)
    b.register(1)
    assert [b.take(1), b.take(1), b.take(1)] == [True, True, False]
    b.give(1)
    assert [b.take(1), b.take(1)] == [True, False]


def test_a_flood_at_one_service_leaves_the_others_the_reserve():
    b = ConnectionBudget(100)  # reserve 25; with 2 services the fair share is 50
    for sid in (1, 2):
        b.register(sid)
    taken = 0
    while b.take(1):
        taken += 1
    assert taken == 75, "the flooded service takes all but the reserve"
    assert sum(b.take(2) for _ in range(40)) == 25, "the other gets the reserve"
    b.give(1)
    assert not b.take(1), "over its share, the flooded service waits for the other's"
    assert b.take(2)
    b.unregister(2)  # alone again: its share is the whole budget
    b.give(1)
    assert b.take(1)


def test_a_service_alone_may_use_every_slot():
    b = ConnectionBudget(8)
    b.register(7)
    assert sum(b.take(7) for _ in range(10)) == 8


def test_queue_budget_says_since_when_the_total_is_over_and_each_holders_share():
    q = QueueBudget(100)
    assert q.report(0, 60, now=1.0) is None  # 60: under
    assert q.report(0, 60, now=2.0) == Pressure(since=2.0, share=60)  # 120 over 2 holders
    assert q.report(0, 30, now=3.0) == Pressure(since=2.0, share=50)  # 150 over 3, same start
    assert q.report(60, 0, now=4.0) is None  # 90: under again
    assert q.report(0, 20, now=5.0) == Pressure(since=5.0, share=36)  # 110 over 3: a new start
    for old in (60, 30, 20):
        q.report(old, 0, now=6.0)
    assert q.report(0, 0, now=7.0) is None
    assert (q._total, q._holders) == (0, 0)


def test_daemon_sizes_proxy_connections_from_the_open_file_limit(tmp_path, caplog):
    cfg = load_config(None)
    small, big = tcp_limits(cfg, 1024), tcp_limits(cfg, 1 << 20)
    room = (1024 - FD_RESERVE - small.max_connections) // 2
    assert proxy_limits(cfg, 1024, small).max_connections == room
    assert proxy_limits(cfg, 1 << 20, big).max_connections == DEFAULT_MAX_CONNECTIONS
    # one client address: a quarter of the budget, whatever sized it
    assert proxy_limits(cfg, 1024, small).max_per_client == room // 4
    assert proxy_limits(cfg, 1 << 20, big).max_per_client == DEFAULT_MAX_CONNECTIONS // 4

    f = tmp_path / "x.toml"
    f.write_text("[lb]\nproxy_max_connections = 5000\nproxy_max_queued_total_mib = 256\n")
    cfg = load_config(f)
    with caplog.at_level(logging.WARNING, logger="xdpfw.daemon"):
        limits = proxy_limits(cfg, 1024, small)
    assert limits.max_connections == room, limits
    assert "proxy_max_connections 5000" in caplog.text, caplog.text
    assert (limits.max_queued, limits.max_queued_total) == (64 * MiB, 256 * MiB), limits
    assert limits.idle_timeout == 300, limits
    assert proxy_limits(cfg, 1 << 20, big).max_connections == 5000

    f.write_text("[lb]\nproxy_idle_timeout_s = 0\n")
    assert proxy_limits(load_config(f), 1024, small).idle_timeout == 0  # never
    for value in (0, 7):  # 0: no cap
        f.write_text(f"[lb]\nproxy_max_connections_per_client = {value}\n")
        assert proxy_limits(load_config(f), 1024, small).max_per_client == value
    for bad, key in (("proxy_max_connections = 100000", "lb.proxy_max_connections"),
                     ("proxy_idle_timeout_s = -1", "lb.proxy_idle_timeout_s"),
                     ("proxy_max_connections_per_client = -1",
                      "lb.proxy_max_connections_per_client")):
        f.write_text(f"[lb]\n{bad}\n")
        with pytest.raises(ConfigError) as e:
            load_config(f)
        assert key in str(e.value), str(e.value)
