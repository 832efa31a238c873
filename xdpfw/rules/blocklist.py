"""Plain-text blocklists: one prefix (or address) per line, `#` starts a comment."""

from __future__ import annotations

from collections.abc import Iterable

from xdpfw.errors import RuleValidationError
from xdpfw.rules.model import Prefix, parse_prefix


def parse_prefixes(lines: Iterable[str], source: str = "line") -> list[Prefix]:
    """Parse every entry, or fail naming the first bad one (nothing is half-applied)."""
    out: list[Prefix] = []
    append = out.append
    for n, line in enumerate(lines, 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        try:
            append(parse_prefix(text))
        except RuleValidationError as e:
            raise RuleValidationError(f"{source} {n}: {e}") from None
    return out


def parse_blocklist(text: str) -> list[Prefix]:
    return parse_prefixes(text.splitlines())
