"""Random IPv4 prefix sets in the mix of a real blocklist, as columns (numpy): fast enough
for the million-rule tests."""

from __future__ import annotations

import numpy as np

from xdpfw.rules.table import Prefixes

LENGTHS = np.array([32, 32, 24, 20, 16, 28], dtype=np.uint8)  # hosts, /24s, some wider


def v4_prefixes(rng: np.random.Generator, n: int, first_octets=range(1, 224)) -> Prefixes:
    """n distinct prefixes whose first octet is one of `first_octets`."""
    octets = np.array(list(first_octets), dtype=np.uint64)
    plen = rng.choice(LENGTHS, size=2 * n)
    net = (rng.choice(octets, size=2 * n) << np.uint64(24)) | rng.integers(
        0, 1 << 24, size=2 * n, dtype=np.uint64)
    net &= ~((np.uint64(1) << (np.uint64(32) - plen.astype(np.uint64))) - np.uint64(1))
    _, first = np.unique((net << np.uint64(6)) | plen, return_index=True)
    keep = np.sort(first)[:n]
    if len(keep) < n:
        raise ValueError(f"only {len(keep)} distinct prefixes drawn, {n} wanted")
    return Prefixes(np.full(n, 4, np.uint8), np.zeros(n, np.uint64), net[keep], plen[keep])


def text(p: Prefixes) -> bytes:
    """A blocklist of them, one a line."""
    nets = p.lo.astype(np.uint32)
    octets = [((nets >> np.uint32(s)) & np.uint32(255)).tolist() for s in (24, 16, 8, 0)]
    return "".join(f"{a}.{b}.{c}.{d}/{n}\n" for a, b, c, d, n in zip(
        *octets, p.plen.tolist(), strict=True)).encode()
