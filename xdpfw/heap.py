"""Giving memory the daemon no longer uses back to the system (glibc's malloc).

A bulk load allocates and frees hundreds of MB of numpy temporaries from two threads (the
request's and the map writer's). With glibc's defaults, freed blocks below a threshold that
grows with every large free stay in the heap, and each thread gets an arena of its own: a
daemon holding 2M rules in ~200 MB of columns showed 750 MB resident, ~330 MB of it free
heap. Likewise BCC's compile at start leaves ~80 MB of LLVM's freed memory behind.

So the daemon fixes the mmap threshold (large temporaries are mapped, and unmapped when
freed), caps the arenas, and trims the heap after start-up and before, during (after each
chunk) and after each bulk change: trimming only at the end left the parse's and the chunks'
freed temporaries resident until then (2M rules: peak 588 MiB, now ~560).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8
MMAP_THRESHOLD = 4 << 20  # chunk-sized temporaries (2 MiB) stay in the heap, reused
ARENAS = 2
BULK = 65_536  # a change this large is followed by a trim

try:
    _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    _mallopt = _libc.mallopt
    _malloc_trim = _libc.malloc_trim
except (OSError, AttributeError):  # not glibc: nothing to tune
    _mallopt = _malloc_trim = None


def tune() -> None:
    """Once, early in the daemon (the settings apply to the whole process)."""
    if _mallopt is None:
        return
    for param, value in ((M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_ARENA_MAX, ARENAS)):
        if not _mallopt(param, value):
            log.debug("mallopt(%d, %d) refused", param, value)


def trim() -> None:
    """Return the heap's free pages to the system (a few ms)."""
    if _malloc_trim is not None:
        _malloc_trim(0)
