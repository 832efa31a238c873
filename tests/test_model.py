"""Rule validation: every malformed input gets a reason a person can act on."""

from __future__ import annotations

import pytest

from xdpfw.errors import RuleValidationError
from xdpfw.rules.blocklist import parse_blocklist
from xdpfw.rules.model import V4, V6, Prefix, Proto, check_match, parse_prefix


@pytest.mark.parametrize(
    ("text", "family", "length", "shown"),
    [
        ("203.0.113.0/24", V4, 24, "203.0.113.0/24"),
        ("198.51.100.7", V4, 32, "198.51.100.7/32"),
        ("0.0.0.0/0", V4, 0, "0.0.0.0/0"),
        ("2001:DB8::/32", V6, 32, "2001:db8::/32"),
        ("::1", V6, 128, "::1/128"),
        (" 10.0.0.0/8 ", V4, 8, "10.0.0.0/8"),
    ],
)
def test_valid_prefixes(text, family, length, shown):
    p = parse_prefix(text)
    assert (p.family, p.length, str(p)) == (family, length, shown)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("10.0.0.1/24", "host bits set (did you mean 10.0.0.0/24?)"),
        ("2001:db8::1/32", "did you mean 2001:db8::/32?"),
        ("10.0.0.0/33", "prefix length must be a number from 0 to 32"),
        ("2001:db8::/129", "from 0 to 128"),
        ("10.0.0.0/x", "prefix length"),
        ("10.0.0.256/32", "not an IPv4 address"),
        ("banana", "not an IPv4 address"),
        ("", "not an IPv4 address"),
        ("fe80::1%eth0/64", "not an IPv6 address"),
    ],
)
def test_malformed_prefixes_say_why(text, reason):
    with pytest.raises(RuleValidationError, match=None) as e:
        parse_prefix(text)
    assert reason in str(e.value), f"{text!r}: {e.value}"


@pytest.mark.parametrize(
    ("proto", "dport", "reason"),
    [
        (None, 22, "needs a protocol"),
        (Proto.ICMP, 22, "has no ports"),
        (Proto.TCP, 0, "out of range"),
        (Proto.UDP, 65536, "out of range"),
    ],
)
def test_bad_matches(proto, dport, reason):
    with pytest.raises(RuleValidationError) as e:
        check_match(proto, dport)
    assert reason in str(e.value)


def test_blocklist_skips_comments_and_names_the_bad_line():
    good = "# feed\n10.0.0.0/8\n\n192.0.2.1  # one host\n2001:db8::/32\n"
    assert parse_blocklist(good) == [
        parse_prefix("10.0.0.0/8"),
        parse_prefix("192.0.2.1"),
        parse_prefix("2001:db8::/32"),
    ]
    with pytest.raises(RuleValidationError) as e:
        parse_blocklist(good + "10.1.1.1/16\n")
    assert str(e.value).startswith("line 6: "), str(e.value)


@pytest.mark.parametrize(
    "line", ["1.2.3.4/", "1.2.3.4/33", "1.2.3.4/24", "1.2.3", "01.2.3.4", "1.2.3.4/-1", "/24"]
)
def test_blocklist_fast_path_refuses_what_parse_prefix_refuses(line):
    with pytest.raises(RuleValidationError) as fast:
        parse_blocklist(line)
    with pytest.raises(RuleValidationError) as slow:
        parse_prefix(line)
    assert str(fast.value) == f"line 1: {slow.value}"


def test_contains_and_parents():
    p = parse_prefix("10.1.0.0/16")
    assert parse_prefix("10.0.0.0/8").contains(p)
    assert not p.contains(parse_prefix("10.0.0.0/8"))
    assert list(p.parent_candidates())[:2] == [
        Prefix(V4, 10 << 24, 15),
        Prefix(V4, 10 << 24, 14),
    ]
