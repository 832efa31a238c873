"""Plain-text blocklists: one prefix (or address) per line, `#` starts a comment."""

from __future__ import annotations

import socket
from collections.abc import Iterable, Iterator

from xdpfw.errors import RuleValidationError
from xdpfw.rules.model import V4, Prefix, parse_prefix

_HOST_BITS_V4 = [(1 << (32 - n)) - 1 for n in range(33)]
_LENGTHS_V4 = {str(n): n for n in range(33)}


def parse_prefixes(lines: Iterable[str], source: str = "line") -> list[Prefix]:
    """Parse every entry, or fail naming the first bad one (nothing is half-applied)."""
    return [p for chunk in iter_prefix_chunks(lines, source) for p in chunk]


def iter_prefix_chunks(
    lines: Iterable[str], source: str = "line", size: int = 1 << 17
) -> Iterator[list[Prefix]]:
    """Parse in chunks of about `size` lines, so that a caller can put one chunk to work while
    the next is parsed; a bad entry raises when its chunk is reached, naming its line.

    Well-formed IPv4 entries take an inlined path (a blocklist is a million of them); anything
    else, including every malformed entry, goes through parse_prefix and its messages."""
    lines = lines if isinstance(lines, list) else list(lines)
    for first in range(0, len(lines), size):
        out = _parse_lines(lines[first : first + size], first, source)
        if out:
            yield out


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
