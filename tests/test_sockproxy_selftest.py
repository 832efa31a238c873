"""The sockproxy self-test that `proxy_mode = "auto"` runs before it splices (loader.self_test,
fallback.load_or_fall_back): real programs, real sockets, in a namespace of its own."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

DROPPING = Path(__file__).parent / "data" / "sockproxy_drops_everything.c"


@pytest.mark.bpf
def test_self_test_passes_and_leaves_nothing_behind() -> None:
    from xdpfw.proxy.loader import SELF_TEST_SERVICE, SockProxyDataplane

    dp = SockProxyDataplane(max_sockets=64, max_services=8)
    try:
        dp.self_test()
        left = {"sp_socks": dp.socket_count("sp_socks"),
                "sp_splice": dp.socket_count("sp_splice"), "sp_peers": dp.peer_count()}
        assert left == {"sp_socks": 0, "sp_splice": 0, "sp_peers": 0}, left
        assert dp.traffic(SELF_TEST_SERVICE).bytes_to_backend == 0, "test counters kept"
    finally:
        dp.close()


@pytest.mark.bpf
def test_self_test_catches_a_verdict_that_loses_bytes(monkeypatch) -> None:
    from xdpfw.proxy import loader

    monkeypatch.setattr(loader, "SELF_TEST_TIMEOUT", 0.5)
    dp = loader.SockProxyDataplane(max_sockets=64, max_services=8, source=DROPPING)
    try:
        with pytest.raises(loader.SelfTestError) as info:
            dp.self_test()
        assert "timed out" in str(info.value) or "received" in str(info.value), info.value
    finally:
        dp.close()


@pytest.mark.bpf
def test_auto_relays_when_the_self_test_fails_and_sockhash_refuses(monkeypatch,
                                                                    caplog) -> None:
    from xdpfw.proxy import loader
    from xdpfw.proxy.fallback import ProxyUnavailableError, load_or_fall_back

    monkeypatch.setattr(loader, "SELF_TEST_TIMEOUT", 0.5)
    made: list[loader.SockProxyDataplane] = []

    def load() -> loader.SockProxyDataplane:
        made.append(loader.SockProxyDataplane(max_sockets=64, max_services=8,
                                              source=DROPPING))
        return made[-1]

    with caplog.at_level(logging.WARNING, logger="xdpfw.proxy.fallback"):
        dp, why = load_or_fall_back("auto", load, "test")
    assert dp is None and why and "self-test" in why, (dp, why)
    assert made[-1].bpf is None, "a dataplane that failed its self-test must be closed"
    assert any("falling back to the user-space relay" in r.message for r in caplog.records)
    with pytest.raises(ProxyUnavailableError, match="self-test"):
        load_or_fall_back("sockhash", load, "test")
    assert made[-1].bpf is None


@pytest.mark.bpf
def test_auto_splices_with_the_real_programs() -> None:
    from xdpfw.proxy.fallback import load_or_fall_back
    from xdpfw.proxy.loader import SockProxyDataplane

    dp, why = load_or_fall_back(
        "auto", lambda: SockProxyDataplane(max_sockets=64, max_services=8), "test")
    try:
        assert dp is not None and why is None, why
    finally:
        if dp is not None:
            dp.close()
