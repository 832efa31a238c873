"""Weighted Maglev consistent hashing (Eisenbud et al., NSDI 2016, section 3.4).

Each backend walks its own permutation of the table slots (offset + j * skip mod M, M prime so
every skip visits every slot) and claims the next free slot on its turn. Weights decide how
often a backend gets a turn: a backend gains `weight` credits per round and takes a turn for
every `max_weight` credits (the scheme katran uses), so shares are proportional to weight while
each backend still fills slots in its own permutation order, which is what keeps the
disruption on backend changes near the minimum.

The permutation comes from blake2b of the backend key, so the same backends give the same
table in every process and across restarts (Python's hash() is randomized per process).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from xdpfw.errors import ServiceValidationError

# Table sizes: prime, and much larger than the backend count (the paper suggests M > 100 * N
# for a balance within 1%).
PRODUCTION_SIZE = 65537
SMALL_SIZE = 4093
TINY_SIZE = 251

EMPTY = -1

_OFFSET_SEED = b"xdpfw-mgl-off"
_SKIP_SEED = b"xdpfw-mgl-skp"


class MaglevError(ServiceValidationError):
    """Invalid input to build_table (bad size, weight or duplicate backend)."""


def is_prime(n: int) -> bool:
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    i = 3
    while i * i <= n:
        if n % i == 0:
            return False
        i += 2
    return True


def _hash64(key: str, seed: bytes) -> int:
    digest = hashlib.blake2b(key.encode(), digest_size=8, salt=seed.ljust(16, b"\0")).digest()
    return int.from_bytes(digest, "little")


def permutation(key: str, size: int) -> tuple[int, int]:
    """(offset, skip) of a backend's walk through a table of `size` slots."""
    return _hash64(key, _OFFSET_SEED) % size, _hash64(key, _SKIP_SEED) % (size - 1) + 1


def _validate(backends: Sequence[tuple[str, int]], size: int) -> None:
    if isinstance(size, bool) or not isinstance(size, int) or not is_prime(size):
        raise MaglevError(
            f"table size must be a prime number (e.g. {PRODUCTION_SIZE}), got {size!r}"
        )
    seen: set[str] = set()
    for key, weight in backends:
        if key in seen:
            raise MaglevError(f"duplicate backend key {key!r}")
        seen.add(key)
        if isinstance(weight, bool) or not isinstance(weight, int) or weight < 0:
            raise MaglevError(f"weight of backend {key!r} must be an integer >= 0, got {weight!r}")
    active = sum(1 for _, w in backends if w > 0)
    if active > size:
        raise MaglevError(f"{active} backends do not fit in a table of {size} slots")


def build_table(backends: Sequence[tuple[str, int]], size: int = PRODUCTION_SIZE) -> list[int]:
    """The Maglev lookup table: slot -> index into `backends`, or EMPTY (-1) if none has weight.

    Backends with weight 0 get no slots (drained) but keep their index, so callers can keep one
    backend array and change only weights.
    """
    _validate(backends, size)
    table = [EMPTY] * size
    active = [i for i, (_, w) in enumerate(backends) if w > 0]
    if not active:
        return table
    max_weight = max(backends[i][1] for i in active)
    # Per active backend: position of its walk, skip, credit, weight. Kept in parallel lists
    # with `pos` holding the *next* candidate slot, so the hot loop is additions only.
    pos: list[int] = []
    skips: list[int] = []
    for i in active:
        offset, skip = permutation(backends[i][0], size)
        pos.append(offset)
        skips.append(skip)
    weights = [backends[i][1] for i in active]
    credit = [0] * len(active)
    filled = 0
    n = len(active)
    while True:
        for b in range(n):
            c = credit[b] + weights[b]
            if c < max_weight:
                credit[b] = c
                continue
            credit[b] = c - max_weight
            p = pos[b]
            s = skips[b]
            while table[p] != EMPTY:
                p += s
                if p >= size:
                    p -= size
            table[p] = active[b]
            p += s
            pos[b] = p - size if p >= size else p
            filled += 1
            if filled == size:
                return table


def shares(table: Sequence[int], count: int) -> list[float]:
    """Fraction of the table each of `count` backends owns (for metrics and tests)."""
    counts = [0] * count
    for entry in table:
        if entry != EMPTY:
            counts[entry] += 1
    return [c / len(table) for c in counts]


def changed_slots(
    old_table: Sequence[int],
    old_keys: Sequence[str],
    new_table: Sequence[int],
    new_keys: Sequence[str],
) -> list[int]:
    """Slots whose backend (by key) differs: what an incremental map update has to rewrite.

    Compares keys, not indices, since removing a backend shifts the indices after it.
    """
    if len(old_table) != len(new_table):
        raise MaglevError(f"table sizes differ: {len(old_table)} != {len(new_table)}")

    def key(keys: Sequence[str], entry: int) -> str | None:
        return None if entry == EMPTY else keys[entry]

    return [
        slot
        for slot, (a, b) in enumerate(zip(old_table, new_table, strict=True))
        if key(old_keys, a) != key(new_keys, b)
    ]
