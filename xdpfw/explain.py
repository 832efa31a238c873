"""Which rule decides for an address, answered by the loaded program itself: a probe frame
(what a sender's packet would look like) is run, under BPF_PROG_TEST_RUN, through the
build's explain instance for the interface: its xdpfw_explain entry point (xdpfw.c), which
decides exactly as the attached xdpfw_main does, from the same maps, and reports the verdict,
the reason and the rule's counter slot over the frame instead of counting anything.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from dataclasses import dataclass

from xdpfw.errors import RuleValidationError
from xdpfw.rules.model import Proto, Rule, check_match

# A protocol no rule can name (RFC 3692, for experiments): a probe "of any protocol" meets
# only the rules of any protocol, and the policy.
ANY_PROTO = 253
IPPROTO = {Proto.TCP: 6, Proto.UDP: 17}
ETH_IPV4, ETH_IPV6 = 0x0800, 0x86DD
PROBE_SPORT = 40000
DEFAULT_DST = {4: "192.0.2.1", 6: "2001:db8::1"}  # documentation addresses
MACS = bytes.fromhex("02000000000202000000000a")  # dst, src: locally administered


@dataclass(frozen=True)
class Probe:
    """The packet an explanation is about."""

    src: str
    dst: str
    proto: Proto | None
    dport: int | None

    @classmethod
    def of(cls, src: str, dst: str | None = None, proto: Proto | None = None,
           dport: int | None = None) -> Probe:
        check_match(proto, dport)
        s = _address(src, "src")
        d = _address(dst, "dst") if dst is not None else ipaddress.ip_address(
            DEFAULT_DST[s.version])
        if d.version != s.version:
            raise RuleValidationError(f"src {s} and dst {d} are not of one address family")
        return cls(str(s), str(d), proto, dport)

    @property
    def family(self) -> int:
        return 6 if ":" in self.src else 4

    def describe(self) -> str:
        what = "any protocol" if self.proto is None else (
            self.proto.value + (f"/{self.dport}" if self.dport else ""))
        return f"{what} from {self.src} to {self.dst}"

    def frame(self) -> bytes:
        """A complete, well-formed frame: Ethernet, IP, then the transport header."""
        v6 = self.family == 6
        if self.proto is None:
            proto, l4 = ANY_PROTO, b"\0" * 8
        elif self.proto is Proto.ICMP:
            proto = 58 if v6 else 1
            l4 = struct.pack("!BBHHH", 128 if v6 else 8, 0, 0, 1, 1)  # echo request
        elif self.proto is Proto.TCP:
            proto = 6
            l4 = struct.pack("!HHIIBBHHH", PROBE_SPORT, self.dport or 0, 1, 0, 5 << 4, 0x02,
                             65535, 0, 0)  # a SYN
        else:
            proto, l4 = 17, struct.pack("!HHHH", PROBE_SPORT, self.dport or 0, 8, 0)
        if v6:
            ip = struct.pack("!IHBB", 6 << 28, len(l4), proto, 64) + socket.inet_pton(
                socket.AF_INET6, self.src) + socket.inet_pton(socket.AF_INET6, self.dst)
            return MACS + struct.pack("!H", ETH_IPV6) + ip + l4
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 1, 0, 64, proto, 0,
                         socket.inet_aton(self.src), socket.inet_aton(self.dst))
        return MACS + struct.pack("!H", ETH_IPV4) + ip + l4


def _address(text: str, what: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(text.strip())
    except ValueError:
        raise RuleValidationError(f"{what}={text!r} is not an IPv4 or IPv6 address") from None


@dataclass(frozen=True)
class Explanation:
    probe: Probe
    verdict: str  # drop | pass: what the interface's instance returns
    reason: str  # abi.REASON_NAMES
    rule: Rule | None  # the deciding rule (None: a policy, or a bad fragment, decided)
    interface: tuple[str, str | None] | None  # (name, netns); None: no interface given
    policy: str  # the policy that decides what no rule decides (the interface's)
    covering: list[Rule]  # every rule whose prefix contains the source, as they decide
