"""A fleet set's layout in etcd (xdpfw/fleet/chunks.py): chunks cut by content, bounded in
size, checked by a node before it applies them; manifests."""

from __future__ import annotations

import numpy as np
import pytest

from xdpfw.errors import RuleValidationError
from xdpfw.fleet.chunks import (
    MAX_CHUNK_BYTES,
    Entry,
    Manifest,
    canonical,
    chunk_key,
    cut,
    decode_manifest,
    pack,
    unpack,
)
from xdpfw.rules.model import Action, parse_prefix
from xdpfw.rules.table import Prefixes


def _hosts(n: int, seed: int = 1) -> Prefixes:
    addrs = np.unique(np.random.default_rng(seed).integers(0, 2**32, n + n // 10,
                                                           dtype=np.uint64))[:n]
    return Prefixes(np.full(len(addrs), 4, np.uint8), np.zeros(len(addrs), np.uint64), addrs,
                    np.full(len(addrs), 32, np.uint8))


def test_a_million_prefixes_round_trip_in_bounded_chunks():
    p = canonical(_hosts(1_000_000))
    chunks = cut(p)
    data = [pack(c) for c in chunks]
    assert 20 <= len(chunks) <= 80
    assert max(map(len, data)) <= MAX_CHUNK_BYTES + 1024
    back = Prefixes.concat([unpack(chunk_key(d), d) for d in data])
    assert (back.lo == p.lo).all() and (back.plen == p.plen).all()


def test_one_prefix_more_or_less_changes_one_chunk():
    p = canonical(_hosts(300_000))
    before = {chunk_key(pack(c)) for c in cut(p)}
    fewer = p.take(np.r_[0:150_000, 150_001:len(p)])
    after = {chunk_key(pack(c)) for c in cut(fewer)}
    assert len(after - before) == 1 and len(before - after) == 1


def test_families_go_to_chunks_of_their_own():
    p = canonical(Prefixes.of([parse_prefix(t) for t in (
        "2001:db8::/32", "10.0.0.0/8", "::/0", "2001:db8::1", "192.0.2.1")]))
    chunks = cut(p)
    assert all(len(set(c.family.tolist())) == 1 for c in chunks)
    v6 = next(c for c in chunks if c.family[0] == 6)
    assert str(unpack(chunk_key(pack(v6)), pack(v6)).prefix(0)) == "::/0"


def test_a_node_refuses_chunks_a_writer_does_not_make():
    good = pack(canonical(Prefixes.of([parse_prefix("10.0.0.0/8")])))
    with pytest.raises(RuleValidationError, match="does not match its key"):
        unpack(chunk_key(good + b"x"), good)
    host_bits = pack(Prefixes(np.array([4], np.uint8), np.zeros(1, np.uint64),
                              np.array([0x0A000001], np.uint64), np.array([8], np.uint8)))
    with pytest.raises(RuleValidationError, match="host bits"):
        unpack(chunk_key(host_bits), host_bits)
    twice = pack(Prefixes.of([parse_prefix("10.0.0.0/8")] * 2))
    with pytest.raises(RuleValidationError, match="twice"):
        unpack(chunk_key(twice), twice)
    with pytest.raises(RuleValidationError, match="too short"):
        unpack(chunk_key(b"XF"), b"XF")


def test_manifests_round_trip_and_garbage_is_refused():
    m = Manifest(Action.DROP, "feed", (Entry("a" * 64, 3, 10), Entry("b" * 64, 2, 20)))
    assert decode_manifest("s", m.encode(), 100) == m
    assert list(m.entries[0].ids) == [10, 11, 12] and m.count == 5
    for bad in (b"{", b'{"action": "drop"}', b'{"action": "x", "chunks": []}',
                b'{"action": "drop", "chunks": [["zz", 1, 1]]}',
                b'{"action": "drop", "chunks": [["' + b"a" * 64 + b'", 5, 3], ["'
                + b"b" * 64 + b'", 1, 4]]}'):
        with pytest.raises(RuleValidationError):
            decode_manifest("s", bad, 100)
    with pytest.raises(RuleValidationError, match="beyond"):
        decode_manifest("s", m.encode(), 15)
