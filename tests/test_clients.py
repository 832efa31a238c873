"""xdpfw/clients.py: who counts as one client for the per-client connection caps."""

from __future__ import annotations

import pytest

from xdpfw.clients import ClientCounts, client_key


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
