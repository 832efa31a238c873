"""The state directory belongs to one `xdpfw serve` at a time, and to root only.

lock() takes an exclusive flock on `xdpfw.lock` in the directory. It is the first thing the
daemon does: a second daemon on the same state finds the lock taken and exits before it
touches the store, the pins, the socket or the pid file. The lock file is never removed
(removing it would let two daemons lock two different files); the kernel drops the lock when
its holder exits, however it exits.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
from pathlib import Path

from xdpfw.errors import StateDirLockedError

LOCK_NAME = "xdpfw.lock"
STORE_NAME = "xdpfw.sqlite3"  # the rules' and the load balancer's tables, one file
DIR_MODE = 0o700
FILE_MODE = 0o600  # the store holds every rule; the pid and lock files are ours alone


def store_path(state_dir: Path | str) -> Path:
    return Path(state_dir) / STORE_NAME


def lock(state_dir: Path) -> int:
    """Lock the state directory (created if missing) and write our pid into the lock file.
    Returns the descriptor that holds the lock; closing it releases it."""
    state_dir.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    path = state_dir / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, FILE_MODE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise StateDirLockedError(
            f"another xdpfw serve (pid {holder}) is running on {state_dir} (it holds {path}); "
            "one daemon per state directory"
        ) from None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def secure(state_dir: Path) -> None:
    """Root only: the directory 0700 and every file in it 0600, including those an older
    version left world-readable (SQLite gives its -wal and -shm files the store's mode)."""
    os.chmod(state_dir, DIR_MODE)
    for entry in os.scandir(state_dir):
        with contextlib.suppress(FileNotFoundError):
            if entry.is_file(follow_symlinks=False) and stat.S_IMODE(
                entry.stat(follow_symlinks=False).st_mode
            ) != FILE_MODE:
                os.chmod(entry.path, FILE_MODE, follow_symlinks=False)
