"""The API over TCP needs the bearer token; over the unix socket it does not (real daemon)."""

from __future__ import annotations

import shutil
import uuid

import httpx
import pytest

from netns_tests.conftest import Daemon, free_port


@pytest.fixture
def tcp_daemon(tmp_path):
    port = free_port()
    cfg = tmp_path / "xdpfw.toml"
    cfg.write_text(f'[api]\nlisten = ["127.0.0.1:{port}"]\ntoken = "t0ken"\n')
    d = Daemon(tmp_path, f"/sys/fs/bpf/xdpfw-test-{uuid.uuid4().hex[:8]}",
               extra_args=["--config", str(cfg)])
    d.start()
    yield d, port
    d.stop()
    shutil.rmtree(d.pin_dir, ignore_errors=True)


def test_tcp_needs_token_unix_socket_does_not(tcp_daemon):
    d, port = tcp_daemon
    assert d.client().get("/api/v1/rules").status_code == 200, d.log()
    url = f"http://127.0.0.1:{port}/api/v1/rules"
    assert httpx.get(url, timeout=10).status_code == 401
    assert httpx.get(url, headers={"authorization": "Bearer wrong"}, timeout=10).status_code == 401
    ok = httpx.get(url, headers={"authorization": "Bearer t0ken"}, timeout=10)
    assert ok.status_code == 200, ok.text


def test_tcp_without_token_is_refused_at_start(tmp_path):
    cfg = tmp_path / "xdpfw.toml"
    cfg.write_text(f'[api]\nlisten = ["127.0.0.1:{free_port()}"]\n')
    d = Daemon(tmp_path, f"/sys/fs/bpf/xdpfw-test-{uuid.uuid4().hex[:8]}",
               extra_args=["--config", str(cfg)])
    try:
        with pytest.raises(RuntimeError) as e:
            d.start(timeout=30)
        assert "needs a token" in str(e.value)
    finally:  # had it started after all, it must not outlive the test
        d.stop()
        shutil.rmtree(d.pin_dir, ignore_errors=True)
