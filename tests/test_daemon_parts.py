"""The pieces `xdpfw serve` is built from that need no kernel: the state directory's lock and
modes."""

from __future__ import annotations

import multiprocessing
import os
import stat

import pytest

from xdpfw import statedir
from xdpfw.errors import StateDirLockedError


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
