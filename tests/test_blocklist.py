"""The vectorised blocklist parser against the line-by-line one, on generated text: the same
prefixes in the same order, or the same error naming the same line."""

from __future__ import annotations

import random

import pytest

from xdpfw.errors import RuleValidationError
from xdpfw.rules import blocklist
from xdpfw.rules.blocklist import parse_blocklist_bytes, parse_prefixes
from xdpfw.rules.table import Prefixes

ATOMS = ["0", "1", "9", "10", "01", "00", "255", "256", "999", "1000", "32", "33", "24", "8"]


def random_line(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.45:  # canonical IPv4, host bits zero or not
        addr = ".".join(str(rng.choice([0, 1, 10, 192, 255, rng.randrange(256)]))
                        for _ in range(4))
        if rng.random() < 0.6:
            addr += "/" + str(rng.choice([0, 8, 16, 24, 30, 32, rng.randrange(33)]))
        return rng.choice(["", " ", "\t"]) + addr + rng.choice(["", " ", "  # x", "#"])
    if kind < 0.75:  # near misses, built from odd parts
        parts = [rng.choice(ATOMS) for _ in range(rng.choice([3, 4, 4, 4, 5]))]
        text = ".".join(parts)
        if rng.random() < 0.5:
            text += rng.choice(["/", "/" + rng.choice(ATOMS), "/-1", "//8", "/8/8"])
        if rng.random() < 0.2:
            i = rng.randrange(len(text) + 1)
            text = text[:i] + rng.choice([" ", ".", "/", "a", "#", "\x1f", ":"]) + text[i:]
        return text
    if kind < 0.85:
        return rng.choice(["2001:db8::/32", "::1", "2001:db8::1/128", "::/0", "fe80::/10",
                           "2001:db8::/129", "::ffff:1.2.3.4"])
    return rng.choice(["", "   ", "# comment", " # 1.2.3.4", "#", "\t"])


def outcome(fn):
    try:
        return ("ok", fn())
    except RuleValidationError as e:
        return ("error", str(e))


@pytest.mark.parametrize("seed", range(40))
def test_vectorised_parser_equals_line_parser(seed, monkeypatch):
    rng = random.Random(seed)
    monkeypatch.setattr(blocklist, "BLOCK", rng.choice([64, 256, 1 << 20]))  # block edges
    lines = [random_line(rng) for _ in range(rng.randint(1, 300))]
    if rng.random() < 0.7:  # mostly good lists, so that the whole list is compared
        lines = [ln for ln in lines if outcome(lambda ln=ln: parse_prefixes([ln]))[0] == "ok"]
    end = rng.choice(["\n", "\r\n"])
    text = end.join(lines) + rng.choice(["", end])
    want = outcome(lambda: Prefixes.of(parse_prefixes(text.splitlines())))
    got = outcome(lambda: parse_blocklist_bytes(text.encode()))
    if want[0] == "ok" and got[0] == "ok":
        assert [str(want[1].prefix(i)) for i in range(len(want[1]))] == [
            str(got[1].prefix(i)) for i in range(len(got[1]))]
    else:
        assert got == want


@pytest.mark.parametrize("text", ["10.0.0.0/8\r10.1.0.0/16\n", "10.0.0.0/8\x0b1.2.3.4\n",
                                  "1.2.3.4 # caf\u00e9\n2001:db8::/32\n", "1.2.3.4\x1c5.6.7.8"])
def test_other_line_breaks_split_as_str_splitlines_does(text):
    want = [str(p) for p in parse_prefixes(text.splitlines())]
    got = parse_blocklist_bytes(text.encode())
    assert [str(got.prefix(i)) for i in range(len(got))] == want


def test_not_utf8_is_refused_with_the_byte():
    with pytest.raises(RuleValidationError, match="not UTF-8"):
        parse_blocklist_bytes(b"10.0.0.0/8\n\xff\xfe\n")
