"""The rule model and its validation. Pure Python: no BCC, no I/O.

A rule matches packets by *source* prefix, optionally narrowed to a protocol and a destination
port. Validation lives here once; the API's pydantic models call into it.
"""

from __future__ import annotations

import re
import socket
from enum import StrEnum
from typing import NamedTuple

from xdpfw.errors import RuleValidationError


class Action(StrEnum):
    DROP = "drop"
    PASS = "pass"  # "allow": accepted as an alias at the API


class Proto(StrEnum):
    TCP = "tcp"
    UDP = "udp"
    ICMP = "icmp"  # ICMP for IPv4 prefixes, ICMPv6 for IPv6 prefixes


IPPROTO = {Proto.TCP: 6, Proto.UDP: 17}
IPPROTO_ICMP = 1
IPPROTO_ICMPV6 = 58
PROTOS_WITH_PORTS = (Proto.TCP, Proto.UDP)

V4, V6 = 4, 6
ADDR_BITS = {V4: 32, V6: 128}


def ip_proto(proto: Proto, family: int) -> int:
    if proto is Proto.ICMP:
        return IPPROTO_ICMP if family == V4 else IPPROTO_ICMPV6
    return IPPROTO[proto]


class Prefix(NamedTuple):
    """A NamedTuple, not a dataclass: bulk loads hash a million of these, and tuples hash in C."""

    family: int  # 4 or 6
    net: int  # network address as an integer, host bits zero
    length: int

    def packed(self) -> bytes:
        return self.net.to_bytes(4 if self.family == V4 else 16, "big")

    def __str__(self) -> str:
        af = socket.AF_INET if self.family == V4 else socket.AF_INET6
        return f"{socket.inet_ntop(af, self.packed())}/{self.length}"

    def contains(self, other: Prefix) -> bool:
        """True when `other` is this prefix or a longer one inside it."""
        if other.family != self.family or other.length < self.length:
            return False
        shift = ADDR_BITS[self.family] - self.length
        return other.net >> shift == self.net >> shift

    def parent_candidates(self):
        """Every shorter prefix that contains this one, longest first."""
        bits = ADDR_BITS[self.family]
        for length in range(self.length - 1, -1, -1):
            mask = ((1 << length) - 1) << (bits - length) if length else 0
            yield Prefix(self.family, self.net & mask, length)


def parse_prefix(text: str) -> Prefix:
    """Parse "a.b.c.d/n", "x::/n" or a bare address (a host route). Host bits must be zero.

    Written with inet_pton rather than the ipaddress module: bulk loads parse a million of these.
    """
    s = text.strip()
    addr, slash, plen = s.partition("/")
    family, af = (V6, socket.AF_INET6) if ":" in addr else (V4, socket.AF_INET)
    try:
        raw = socket.inet_pton(af, addr)
    except (OSError, ValueError):
        raise RuleValidationError(f"{text!r} is not an IPv{family} address or prefix") from None
    bits = ADDR_BITS[family]
    if slash:
        if not plen.isdigit() or not 0 <= int(plen) <= bits:
            raise RuleValidationError(
                f"{text!r}: prefix length must be a number from 0 to {bits}"
            )
        length = int(plen)
    else:
        length = bits
    net = int.from_bytes(raw, "big")
    if net & ((1 << (bits - length)) - 1):
        mask = ((1 << length) - 1) << (bits - length)
        fixed = Prefix(family, net & mask, length)
        raise RuleValidationError(f"{text!r} has host bits set (did you mean {fixed}?)")
    return Prefix(family, net, length)


SET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def check_set_name(name: str) -> str:
    """A set's name goes into URL paths, file names of feeds and log lines: letters, digits,
    '_', '.' and '-', starting with a letter or digit, at most 64 characters."""
    if not SET_NAME.fullmatch(name):
        raise RuleValidationError(
            f"{name[:80]!r} is not a set name: 1-64 of A-Z a-z 0-9 _ . -, starting with a "
            "letter or digit")
    return name


def check_match(proto: Proto | None, dport: int | None) -> None:
    if dport is not None:
        if proto is None:
            raise RuleValidationError("a destination port needs a protocol (tcp or udp)")
        if proto not in PROTOS_WITH_PORTS:
            raise RuleValidationError(f"protocol {proto.value} has no ports")
        if not 1 <= dport <= 65535:
            raise RuleValidationError(f"port {dport} is out of range 1-65535")


class Rule(NamedTuple):
    """A NamedTuple for the same reason as Prefix: a bulk load builds a million of them."""

    id: int
    prefix: Prefix
    action: Action
    proto: Proto | None = None
    dport: int | None = None
    comment: str = ""
    slot: int = 0  # index of this rule's counters in the data plane
    rule_set: str = ""  # the named set the rule belongs to ("": none)

    @property
    def match_key(self) -> tuple[Prefix, Proto | None, int | None]:
        """Two rules with the same key are duplicates."""
        return (self.prefix, self.proto, self.dport)
