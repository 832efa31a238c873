"""The pieces `xdpfw serve` is built from that need no kernel: the state directory's lock and
modes, the log rate limit, the open-file limit, the config knobs of the API."""

from __future__ import annotations

import logging
import multiprocessing
import os
import resource
import stat

import pytest

from xdpfw import statedir
from xdpfw.config import AppConfig
from xdpfw.daemon import FD_RESERVE, raise_fd_limit, tcp_limits
from xdpfw.errors import StateDirLockedError
from xdpfw.logfilter import RateLimit


def _hold_lock(path, ready, done):
    fd = statedir.lock(path)
    ready.set()
    done.wait(10)
    os.close(fd)


def test_a_second_lock_on_a_state_dir_fails_and_names_the_holder(tmp_path):
    ctx = multiprocessing.get_context("fork")
    ready, done = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(tmp_path, ready, done))
    holder.start()
    try:
        assert ready.wait(10)
        with pytest.raises(StateDirLockedError, match=f"pid {holder.pid}"):
            statedir.lock(tmp_path)
        assert (tmp_path / statedir.LOCK_NAME).read_text().strip() == str(holder.pid)
    finally:
        done.set()
        holder.join(10)
    fd = statedir.lock(tmp_path)  # free again once its holder is gone
    os.close(fd)


def test_secure_makes_the_state_dir_root_only(tmp_path):
    state = tmp_path / "state"
    state.mkdir(mode=0o755)
    os.chmod(state, 0o755)
    for name in ("xdpfw.sqlite3", "xdpfw.sqlite3-wal", "xdpfw.pid"):
        (state / name).write_text("x")
        os.chmod(state / name, 0o644)
    statedir.secure(state)
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in state.iterdir()}
    assert set(modes.values()) == {0o600}, modes


def test_the_log_rate_limit_holds_back_a_flood_and_says_how_much():
    now = [0.0]
    limit = RateLimit(burst=3, total=100, period=10, clock=lambda: now[0])

    def record(msg="accept failed: %s", args=("EMFILE",), name="asyncio"):
        return logging.LogRecord(name, logging.ERROR, __file__, 1, msg, args, None)

    passed = [limit.filter(record()) for _ in range(1000)]
    assert sum(passed) == 3
    assert limit.filter(record("another kind")), "one kind's flood silenced the others"
    now[0] = 10.5
    first = record()
    assert limit.filter(first)
    assert first.getMessage() == "accept failed: EMFILE [997 more like this were not logged]"
    now[0] = 21
    many = [limit.filter(record(f"distinct {i}", ())) for i in range(500)]
    assert sum(many) == 100, "the total per period was not enforced"


def test_the_soft_open_file_limit_is_raised_to_the_hard_one():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(1024, hard), hard))
    try:
        assert raise_fd_limit() == hard
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_api_limits_have_defaults_and_respect_the_fd_limit():
    cfg = AppConfig()
    assert (cfg.api.max_body_bytes, cfg.api.max_bulk_body_bytes) == (1 << 20, 64 << 20)
    limits = tcp_limits(cfg, 20_000)
    assert (limits.max_connections, limits.header_timeout_s, limits.idle_timeout_s,
            limits.max_per_client) == (256, 10.0, 30.0, 64)
    cfg.api.max_connections = 50_000
    assert tcp_limits(cfg, 20_000).max_connections == 20_000 - FD_RESERVE
    assert tcp_limits(cfg, 20_000).max_per_client == (20_000 - FD_RESERVE) // 4
    for value in (0, 5):  # 0: no cap
        cfg.api.max_connections_per_client = value
        assert tcp_limits(cfg, 20_000).max_per_client == value
