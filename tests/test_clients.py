"""xdpfw/clients.py: who counts as one client for the per-client connection caps."""

from __future__ import annotations

import pytest

from xdpfw.clients import REFUSAL_LOG_S, ClientCounts, RefusalLog, client_key, per_client_cap


@pytest.mark.parametrize(("host", "key"), [
    ("10.1.2.3", "10.1.2.3"),
    ("::ffff:10.1.2.3", "10.1.2.3"),  # a dual-stack listener's IPv4 client
    ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
    ("2001:db8:1:2:ffff:ffff:ffff:ffff", "2001:db8:1:2::/64"),  # same /64: same client
    ("2001:db8:1:3::1", "2001:db8:1:3::/64"),
    ("fe80::1%eth0", "fe80::/64"),
])
def test_client_key_counts_an_ipv4_address_or_an_ipv6_slash_64(host, key):
    assert client_key(host) == key


def test_client_counts_cap_each_client_and_forget_those_without_connections():
    c = ClientCounts(2)
    a, b = client_key("10.0.0.1"), client_key("2001:db8::1")
    assert [c.take(a), c.take(a), c.take(a)] == [True, True, False]
    assert c.take(b) and c.take(client_key("2001:db8::2")) and not c.take(b)  # one /64
    c.give(a)
    assert c.take(a) and not c.take(a)
    for _ in range(2):
        c.give(a)
        c.give(b)
    assert c.held(a) == c.held(b) == 0 and not c._held, c._held
    unlimited = ClientCounts(0)
    assert all(unlimited.take(a) for _ in range(1000))


def test_per_client_cap_is_a_quarter_of_the_total_unless_configured():
    assert [per_client_cap(None, n) for n in (256, 1000, 3, 0)] == [64, 250, 1, 1]
    assert per_client_cap(0, 256) == 0 and per_client_cap(7, 256) == 7  # 0: no cap


def test_refusal_log_says_the_first_then_the_count_at_most_every_period(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr("xdpfw.clients.time.monotonic", lambda: now[0])
    log = RefusalLog()
    assert [log.refused() for _ in range(4)] == [1, 0, 0, 0]
    now[0] += REFUSAL_LOG_S
    assert log.refused() == 4  # the three held back, and this one
    now[0] += REFUSAL_LOG_S / 2
    assert log.refused() == 0
