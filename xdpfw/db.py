"""One SQLite database file, opened the way every xdpfw store needs it."""

from __future__ import annotations

import contextlib
import errno
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

from xdpfw.errors import StorageError, StorageFullError

# Primary result codes (the low byte of sqlite_errorcode) that mean "the storage failed",
# not "the statement was wrong".
SQLITE_FULL = 13
# BUSY, LOCKED, READONLY, IOERR, CORRUPT, FULL, CANTOPEN, PROTOCOL
SQLITE_STORAGE = frozenset({5, 6, 8, 10, 11, SQLITE_FULL, 14, 15})
ERRNO_FULL = {errno.ENOSPC, errno.EDQUOT}
ERRNO_STORAGE = ERRNO_FULL | {errno.EIO, errno.EROFS}


def storage_error(exc: BaseException) -> StorageError | None:
    """The typed error for a failure of the disk or the database file under it (full, I/O
    error, locked, read-only), or None when `exc` is something else."""
    if isinstance(exc, StorageError):
        return exc
    if isinstance(exc, sqlite3.Error):
        code = getattr(exc, "sqlite_errorcode", None)
        if code is None or code & 0xFF not in SQLITE_STORAGE:
            return None
        cls = StorageFullError if code & 0xFF == SQLITE_FULL else StorageError
        name = getattr(exc, "sqlite_errorname", "")
        return cls(f"the store failed: {exc} ({name}); nothing was changed")
    # Only errors of file calls (they name the file): a bpf() call failing with ENOSPC is a
    # full map, not a full disk.
    if isinstance(exc, OSError) and exc.filename and exc.errno in ERRNO_STORAGE:
        cls = StorageFullError if exc.errno in ERRNO_FULL else StorageError
        return cls(f"the state directory cannot be written: {exc.strerror} ({exc.filename}); "
                   "nothing was changed")
    return None


class SqliteDb:
    """WAL with synchronous=FULL: a commit is on disk before the API answers. Writers take
    `transaction()`, which commits on success and rolls back on any exception (the caller then
    reverts the BPF maps)."""

    def __init__(self, path: Path | str, schema: str) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Several stores share the file: wait for each other's transactions, do not fail.
        self._db = sqlite3.connect(
            self.path, check_same_thread=False, isolation_level=None, timeout=10
        )
        self._lock = threading.RLock()
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(schema)

    def close(self) -> None:
        self._db.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """A failure of the storage (disk full, I/O error, locked) surfaces as StorageError;
        either way the transaction is over when this raises: a failed COMMIT is rolled back
        too, so the next writer does not find one still open."""
        with self._lock, _typed_storage_errors():
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                self._rollback()
                raise
            try:
                self._db.execute("COMMIT")
            except BaseException:
                self._rollback()
                raise

    def _rollback(self) -> None:
        # SQLite ends the transaction itself on some errors (SQLITE_FULL, SQLITE_IOERR):
        # a ROLLBACK then would raise "no transaction is active" over the real cause.
        if self._db.in_transaction:
            self._db.execute("ROLLBACK")


@contextlib.contextmanager
def _typed_storage_errors() -> Iterator[None]:
    try:
        yield
    except sqlite3.Error as e:
        typed = storage_error(e)
        if typed is None or typed is e:
            raise
        raise typed from e
