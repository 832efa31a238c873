"""A fleet set in etcd: its prefixes cut into content-addressed chunks, and a manifest that
lists them. A million prefixes are ~40 chunks of at most 512 KiB, not a million keys.

    chunks/<sha256 hex>     packed prefixes of one family, sorted, no repeats:
                            "XFS1", u8 family, u32 count (little-endian), then count
                            addresses (4 or 16 bytes, network order), then count lengths
    data/sets/<name>        the manifest, JSON: {"action", "comment", "count",
                            "chunks": [[sha256 hex, count, first rule id], ...]} in
                            prefix order; id ranges do not overlap

Where a chunk ends depends on its content (a hash of each prefix), not on its position, so
adding or removing a prefix changes the one chunk around it and a node applies only that
chunk: the others keep their key and their rule ids. Chunks live outside data/ (nodes watch
data/, and need only the chunks a manifest change names); they are read at the manifest's
revision, so a writer may delete the chunks no manifest names any more right after.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from dataclasses import dataclass

import numpy as np

from xdpfw.errors import RuleValidationError
from xdpfw.rules.model import V4, V6, Action
from xdpfw.rules.table import Prefixes

MAGIC = b"XFS1"
HEADER = struct.Struct("<4sBI")
AVG_ENTRIES = 1 << 15  # a cut after a prefix whose hash is 0 modulo this ...
MAX_CHUNK_BYTES = 512 << 10  # ... or where a chunk would outgrow this (etcd takes 1.5 MiB)
MAX_MANIFEST_BYTES = 1 << 20
ADDR_BYTES = {V4: 4, V6: 16}


@dataclass(frozen=True)
class Entry:
    """A chunk as a manifest lists it: its rules have ids first_id .. first_id + count - 1."""

    key: str
    count: int
    first_id: int

    @property
    def ids(self) -> range:
        return range(self.first_id, self.first_id + self.count)


@dataclass(frozen=True)
class Manifest:
    action: Action
    comment: str
    entries: tuple[Entry, ...]

    @property
    def count(self) -> int:
        return sum(e.count for e in self.entries)

    def encode(self) -> bytes:
        return json.dumps({"action": self.action.value, "comment": self.comment,
                           "count": self.count,
                           "chunks": [[e.key, e.count, e.first_id] for e in self.entries]},
                          separators=(",", ":")).encode()


def decode_manifest(name: str, value: bytes, max_id: int) -> Manifest:
    """A manifest as a node accepts it; RuleValidationError says what is wrong."""
    where = f"set {name}"
    if len(value) > MAX_MANIFEST_BYTES:
        raise RuleValidationError(f"{where}: a manifest of {len(value)} bytes is too large")
    try:
        data = json.loads(value)
        action = Action(data["action"])
        comment = data.get("comment", "")
        chunks = data["chunks"]
        if not isinstance(comment, str) or len(comment) > 256 or not isinstance(chunks, list):
            raise ValueError
        entries = tuple(Entry(str(k), int(n), int(i)) for k, n, i in chunks)
    except (ValueError, KeyError, TypeError):
        raise RuleValidationError(f"{where}: the manifest is not one a writer makes") from None
    last = 0  # id ranges, in id order, must not overlap (a kept chunk keeps older ids)
    for e in sorted(entries, key=lambda e: e.first_id):
        if not re.fullmatch(r"[0-9a-f]{64}", e.key) or e.count < 1 or e.first_id <= last:
            raise RuleValidationError(f"{where}: chunk {e.key[:16]}: bad key, count or ids")
        last = e.first_id + e.count - 1
    if len({e.key for e in entries}) != len(entries):
        raise RuleValidationError(f"{where}: a chunk is listed twice")
    if last > max_id:
        raise RuleValidationError(f"{where}: ids beyond {max_id}")
    return Manifest(action, comment, entries)


# -- the writer's side --------------------------------------------------------------------


def canonical(prefixes: Prefixes) -> Prefixes:
    """Sorted by family, address, length; a repeat is refused."""
    order = np.lexsort((prefixes.plen, prefixes.lo, prefixes.hi, prefixes.family))
    p = prefixes.take(order)
    same = ((p.family[1:] == p.family[:-1]) & (p.hi[1:] == p.hi[:-1])
            & (p.lo[1:] == p.lo[:-1]) & (p.plen[1:] == p.plen[:-1]))
    if same.any():
        raise RuleValidationError(f"{p.prefix(int(np.argmax(same)) + 1)} appears twice")
    return p


def cut(prefixes: Prefixes) -> list[Prefixes]:
    """Canonical prefixes into chunks of one family each, cut where the content says."""
    out = []
    for family in (V4, V6):
        p = prefixes.take(np.nonzero(prefixes.family == family)[0])
        if not len(p):
            continue
        h = (p.lo * np.uint64(0x9E3779B97F4A7C15)) ^ (p.hi * np.uint64(0xC2B2AE3D27D4EB4F))
        h ^= p.plen.astype(np.uint64) * np.uint64(0x165667B19E3779F9)
        h ^= h >> np.uint64(29)
        h *= np.uint64(0xBF58476D1CE4E5B9)
        natural = (np.nonzero(h >> np.uint64(40) & np.uint64(AVG_ENTRIES - 1) == 0)[0] + 1)
        most = MAX_CHUNK_BYTES // (ADDR_BYTES[family] + 1)
        start = 0
        for end in [*natural.tolist(), len(p)]:
            while end - start > most:  # no natural cut for too long: a forced one
                out.append(p.take(slice(start, start + most)))
                start += most
            if end > start:
                out.append(p.take(slice(start, end)))
                start = end
    return out


def pack(chunk: Prefixes) -> bytes:
    family = int(chunk.family[0])
    if family == V4:
        addrs = chunk.lo.astype(">u4").tobytes()
    else:
        a = np.empty((len(chunk), 2), dtype=">u8")
        a[:, 0], a[:, 1] = chunk.hi, chunk.lo
        addrs = a.tobytes()
    return HEADER.pack(MAGIC, family, len(chunk)) + addrs + chunk.plen.astype(np.uint8).tobytes()


def chunk_key(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- the node's side ----------------------------------------------------------------------


def unpack(key: str, data: bytes) -> Prefixes:
    """A chunk's prefixes, checked: its hash, its layout, lengths, host bits, order."""
    if chunk_key(data) != key:
        raise RuleValidationError(f"chunk {key[:16]}: its content does not match its key")
    try:
        magic, family, n = HEADER.unpack_from(data)
    except struct.error:
        raise RuleValidationError(f"chunk {key[:16]}: too short") from None
    size = ADDR_BYTES.get(family)
    if magic != MAGIC or size is None or len(data) != HEADER.size + n * (size + 1):
        raise RuleValidationError(f"chunk {key[:16]}: not a chunk a writer makes")
    body = data[HEADER.size:]
    plen = np.frombuffer(body, np.uint8, n, n * size)
    if family == V4:
        lo = np.frombuffer(body, ">u4", n).astype(np.uint64)
        hi = np.zeros(n, np.uint64)
        bits = 32
    else:
        halves = np.frombuffer(body, ">u8", 2 * n).reshape(-1, 2)
        hi, lo = halves[:, 0].astype(np.uint64), halves[:, 1].astype(np.uint64)
        bits = 128
    if n and int(plen.max()) > bits:
        raise RuleValidationError(f"chunk {key[:16]}: a prefix longer than {bits}")
    p = Prefixes(np.full(n, family, np.uint8), hi, lo, plen.copy())
    if _host_bits(p).any():
        raise RuleValidationError(f"chunk {key[:16]}: a prefix with host bits set")
    try:
        canonical(p)
    except RuleValidationError as e:
        raise RuleValidationError(f"chunk {key[:16]}: {e}") from None
    return p


def _host_bits(p: Prefixes) -> np.ndarray:
    """Which prefixes have a bit set past their length."""
    if not len(p):
        return np.zeros(0, bool)
    if int(p.family[0]) == V4:
        host = (np.uint64(1) << (np.uint64(32) - p.plen.astype(np.uint64))) - np.uint64(1)
        return (p.lo & host) != 0
    plen = p.plen.astype(np.int64)
    lo_bits = np.clip(128 - plen, 0, 64).astype(np.uint64)
    hi_bits = np.clip(64 - plen, 0, 64).astype(np.uint64)
    lo_mask = np.where(lo_bits == 64, ~np.uint64(0),
                       (np.uint64(1) << np.minimum(lo_bits, np.uint64(63))) - np.uint64(1))
    hi_mask = np.where(hi_bits == 64, ~np.uint64(0),
                       (np.uint64(1) << np.minimum(hi_bits, np.uint64(63))) - np.uint64(1))
    return ((p.lo & lo_mask) != 0) | ((p.hi & hi_mask) != 0)
