"""Plain-text blocklists: one prefix (or address) per line, `#` starts a comment."""

from __future__ import annotations

import socket
from collections.abc import Iterable

import numpy as np

from xdpfw.errors import RuleValidationError
from xdpfw.rules.model import V4, Prefix, parse_prefix
from xdpfw.rules.table import Prefixes

BLOCK = 1 << 18  # bytes of a blocklist read at a time by the vectorised parser

_HOST_BITS_V4 = [(1 << (32 - n)) - 1 for n in range(33)]
_LENGTHS_V4 = {str(n): n for n in range(33)}


def parse_prefixes(lines: Iterable[str], source: str = "line", first: int = 0) -> list[Prefix]:
    """Parse every entry, or fail naming the first bad one (nothing is half-applied);
    entries are numbered from first + 1.

    Well-formed IPv4 entries take an inlined path; anything else, including every malformed
    entry, goes through parse_prefix and its messages."""
    return _parse_lines(lines if isinstance(lines, list) else list(lines), first, source)


def _parse_lines(lines: list[str], first: int, source: str) -> list[Prefix]:
    out: list[Prefix] = []
    append = out.append
    pton, af4, frm, new = socket.inet_pton, socket.AF_INET, int.from_bytes, tuple.__new__
    host_bits, lengths = _HOST_BITS_V4, _LENGTHS_V4
    for line in lines:
        if "#" in line:
            line = line.split("#", 1)[0]
        text = line.strip()
        if not text:
            continue
        addr, slash, plen = text.partition("/")
        length = lengths.get(plen) if slash else 32
        if length is not None and ":" not in addr:
            try:
                net = frm(pton(af4, addr), "big")
            except OSError:
                net = -1
            if net >= 0 and not net & host_bits[length]:
                append(new(Prefix, (V4, net, length)))  # tuple.__new__: no Python frame
                continue
        try:
            append(parse_prefix(text))
        except RuleValidationError as e:
            n = first + _index_of_bad(lines, text) + 1  # only errors pay for the line number
            raise RuleValidationError(f"{source} {n}: {e}") from None
    return out


def _index_of_bad(lines: list[str], text: str) -> int:
    for i, line in enumerate(lines):
        if line.split("#", 1)[0].strip() == text:
            try:
                parse_prefix(text)
            except RuleValidationError:
                return i
    raise AssertionError("the bad line was not found again")


def parse_blocklist(text: str) -> list[Prefix]:
    return parse_prefixes(text.splitlines())


# -- the vectorised parser --------------------------------------------------------------
# A blocklist of two million lines is parsed through numpy, a block of lines at a time: no
# Python object per line. Only lines in the one canonical IPv4 form (four octets without
# leading zeros, an optional /length without one, host bits zero, optional blanks and
# comment) are read that way; every other line, IPv6 and every mistake included, goes
# through parse_prefix as one str, so the result and the messages are exactly those of
# parse_prefixes over text.splitlines() (tests/test_blocklist.py compares the two).


def parse_blocklist_bytes(data: bytes | bytearray, source: str = "line",
                          first_line: int = 1) -> Prefixes:
    """Every prefix of a blocklist in UTF-8 bytes, as columns, in line order; a bad line
    raises, naming it (the first line of `data` is line `first_line`)."""
    buf = np.frombuffer(data, dtype=np.uint8)
    if _needs_text_path(buf):  # other line breaks (or non-ASCII): str.splitlines decides
        try:
            text = data.decode()
        except UnicodeDecodeError as e:
            raise RuleValidationError(
                f"the blocklist is not UTF-8 text (byte {e.start}: "
                f"{bytes(data[e.start:e.start + 1])!r})") from None
        return Prefixes.of(parse_prefixes(text.splitlines(), source, first_line - 1))
    parts, line0, start = [], first_line - 1, 0
    while start < len(data):
        end = data.rfind(b"\n", start, start + BLOCK) + 1
        if end <= start:  # a line longer than a block: take it whole
            end = data.find(b"\n", start + BLOCK)
            end = len(data) if end < 0 else end + 1
        if start + BLOCK >= len(data):
            end = len(data)
        block = buf[start:end]
        parts.append(_parse_block(block, data, start, line0, source))
        line0 += int(np.count_nonzero(block == 10)) + (block[-1] != 10)
        start = end
    return Prefixes.concat(parts)


def _needs_text_path(buf: np.ndarray) -> bool:
    """Bytes that str.splitlines() or UTF-8 reads differently from b"\\n": non-ASCII, \\v,
    \\f, \\x1c-\\x1e, or a \\r that is not part of \\r\\n (one at the very end is)."""
    if (buf >= 0x80).any() or ((buf >= 0x0B) & (buf <= 0x0C)).any() or (
            (buf >= 0x1C) & (buf <= 0x1E)).any():
        return True
    cr = np.flatnonzero(buf == 13)
    after = cr + 1
    return bool(((after < len(buf)) & (buf[np.minimum(after, len(buf) - 1)] != 10)).any())


def _parse_block(c: np.ndarray, data: bytes, offset: int, line0: int,
                 source: str) -> Prefixes:
    """The lines of one block (it ends at a line end). Runs of digits are the fields: a
    line is read here when its non-blank, non-comment bytes are one contiguous run of
    d.d.d.d or d.d.d.d/d."""
    n = len(c)
    nl = c == 10
    starts = np.concatenate(([0], np.flatnonzero(nl) + 1)).astype(np.int64)
    if starts[-1] == n:
        starts = starts[:-1]
    nlines = len(starts)
    line = (np.cumsum(nl, dtype=np.int32) - nl).astype(np.int32)  # each byte's line
    is_hash = c == 35
    hashes = np.cumsum(is_hash, dtype=np.int32)
    comment = hashes - (hashes[starts] - is_hash[starts])[line] > 0
    digit, dot, slash = (c >= 48) & (c <= 57), c == 46, c == 47
    eff = ~comment & ~((c == 32) | (c == 9) | (c == 13) | nl)  # what strip() leaves

    def per_line(x: np.ndarray) -> np.ndarray:
        return np.add.reduceat(x.astype(np.int32), starts)

    pos = np.arange(n, dtype=np.int32)
    n_eff, n_dot, n_slash = per_line(eff), per_line(eff & dot), per_line(eff & slash)
    first = np.minimum.reduceat(np.where(eff, pos, n), starts)
    last = np.maximum.reduceat(np.where(eff, pos, -1), starts)
    last_dot = np.maximum.reduceat(np.where(eff & dot, pos, -1), starts)
    slash_at = np.maximum.reduceat(np.where(eff & slash, pos, -1), starts)
    fast = ((n_eff > 0) & (per_line(eff & ~(digit | dot | slash)) == 0) & (n_dot == 3)
            & (n_slash <= 1) & (last - first + 1 == n_eff)
            & ((n_slash == 0) | (slash_at > last_dot)))
    d = eff & digit
    run_start = np.flatnonzero(d & ~np.concatenate(([False], d[:-1])))
    run_end = np.flatnonzero(d & ~np.concatenate((d[1:], [False])))
    run_len = run_end - run_start + 1
    run_line = line[run_start]
    runs = np.bincount(run_line, minlength=nlines)
    fast &= runs == n_dot + n_slash + 1  # no empty field
    v = c.astype(np.int32) - 48
    val = (v[run_end] + np.where(run_len >= 2, 10 * v[np.maximum(run_end - 1, 0)], 0)
           + np.where(run_len >= 3, 100 * v[np.maximum(run_end - 2, 0)], 0))
    k = np.arange(len(run_start)) - (np.cumsum(runs) - runs)[run_line]  # field number
    bad = (((run_len > 1) & (c[run_start] == 48)) | (run_len > 3) | ((k < 4) & (val > 255))
           | ((k >= 4) & ((run_len > 2) | (val > 32))) | (k > 4))
    fast &= np.bincount(run_line[bad], minlength=nlines) == 0
    keep = fast[run_line]
    fields = np.zeros((nlines, 5), dtype=np.int64)
    fields[run_line[keep], k[keep]] = val[keep]
    plen = np.where(n_slash == 1, fields[:, 4], 32)
    net = (fields[:, 0] << 24) | (fields[:, 1] << 16) | (fields[:, 2] << 8) | fields[:, 3]
    fast &= (net & ((np.int64(1) << (32 - plen)) - 1)) == 0
    fast_lines = np.flatnonzero(fast)
    # Everything else that is not blank goes through parse_prefix, as text.
    slow_lines, slow = [], []
    ends = np.append(starts[1:], n)
    for i in np.flatnonzero(~fast & (n_eff > 0)).tolist():
        text = data[offset + int(starts[i]): offset + int(ends[i])].decode()
        text = text.split("#", 1)[0].strip()
        if not text:
            continue
        try:
            slow.append(parse_prefix(text))
        except RuleValidationError as e:
            raise RuleValidationError(f"{source} {line0 + i + 1}: {e}") from None
        slow_lines.append(i)
    out = Prefixes(np.full(len(fast_lines), V4, np.uint8), np.zeros(len(fast_lines), np.uint64),
                   net[fast_lines].astype(np.uint64), plen[fast_lines].astype(np.uint8))
    if not slow:
        return out
    both = Prefixes.concat([out, Prefixes.of(slow)])
    return both.take(np.argsort(np.concatenate([fast_lines, slow_lines]), kind="stable"))
