"""An independent model of the firewall's per-packet semantics, for differential testing.

Written only from the README sections "Rule semantics" and "How a packet is read, and which
verdict it gets" (the contract), never from xdpfw/bpf/ or xdpfw/rules/compile.py: the point is a
second implementation that shares no code and no reading of the C with the program. It is slow
and literal on purpose: rules are matched by brute force over the rule list, and the strictest
verdict of a source by enumerating the complete packets it could send.

Where the README can be read two ways, the reading chosen is a named knob below, so that the
model can follow a decision without being rewritten.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from functools import cache

PASS, DROP = "XDP_PASS", "XDP_DROP"

ETH_HLEN = 14
VLAN_TPIDS = (0x8100, 0x88A8)
ETH_IP, ETH_IPV6, ETH_ARP = 0x0800, 0x86DD, 0x0806
TCP, UDP, ICMP, ICMPV6 = 6, 17, 1, 58
HOPOPTS, ROUTING, FRAGMENT, DSTOPTS, AH = 0, 43, 44, 60, 51
ND_TYPES = range(133, 138)  # router solicitation .. redirect

# -- the README's bounds, and the readings chosen where it is silent ------------------------
MAX_VLAN_TAGS = 2  # "at most two tags"
MAX_EXT_HEADERS = 16  # "at most 16 extension headers are walked: a 17th is incomplete"
# After a first fragment (offset 0, M set), a second Fragment header with a non-zero offset:
# True reads "the rest of the chain must be complete, transport header included" literally
# (frag_chain); False lets that header end the walk as a non-first fragment.
NESTED_NONFIRST_IS_FRAG_CHAIN = True
# After a first fragment, a 17th extension header: True = frag_chain ("the rest of the chain
# must be complete ... if it is not, frag_chain, not incomplete"), False = incomplete.
FIRST_FRAG_BOUND_IS_FRAG_CHAIN = True
# The strictest verdict of a source: False enumerates what complete packets from it would
# actually get (a port rule shadowed by a longer "any" rule decides nothing); True also counts
# every proto/proto+port rule whose prefix contains the source, shadowed or not.
STRICTEST_COUNTS_SHADOWED_RULES = False
KNOBS = ("NESTED_NONFIRST_IS_FRAG_CHAIN", "FIRST_FRAG_BOUND_IS_FRAG_CHAIN",
         "STRICTEST_COUNTS_SHADOWED_RULES")

# Outcomes of reading a frame.
UNREADABLE = "unreadable"
NON_IP = "non_ip"
BAD_FRAGMENT = "bad_fragment"
INCOMPLETE = "incomplete"
COMPLETE = "complete"
NON_FIRST = "non_first_fragment"

REASONS = (
    "rule_pass", "rule_drop", "policy_pass", "policy_drop", "unparsed_pass", "unparsed_drop",
    "l2_exempt_pass", "frag_overlap", "frag_tiny", "frag_chain",
)

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class Rule:
    prefix: str
    action: str  # "drop" | "pass"
    proto: str | None = None  # "tcp" | "udp" | "icmp"
    dport: int | None = None

    @property
    def network(self) -> Network:
        return _network(self.prefix)

    def __str__(self) -> str:
        match = f" {self.proto}" if self.proto else ""
        return f"{self.action} {self.prefix}{match}{f' {self.dport}' if self.dport else ''}"


@cache
def _network(prefix: str) -> Network:
    return ipaddress.ip_network(prefix)  # strict: host bits set are a test bug


@dataclass(frozen=True)
class Iface:
    policy: str = "pass"  # packets no rule decides
    unparsed_policy: str = "pass"
    guard_l2: bool = False


@dataclass(frozen=True)
class Parsed:
    """What reading a frame established: the outcome, and what it says about the packet."""

    outcome: str
    ethertype: int | None = None  # after the VLAN tags
    src: Address | None = None  # known from the fixed IP header on
    proto: int | None = None  # complete and non-first fragments
    dport: int | None = None  # complete TCP/UDP only
    bad: str | None = None  # frag_overlap / frag_tiny / frag_chain
    has_fragment_header: bool = False  # IPv6, any Fragment header walked (atomic included)
    next_byte: int | None = None  # complete: first byte after the chain, if in the packet
    note: str = ""  # why: which check decided, for mismatch reports


def _be16(b: bytes, at: int) -> int:
    return (b[at] << 8) | b[at + 1]


# -- reading --------------------------------------------------------------------------------


def parse(frame: bytes) -> Parsed:
    """Steps 1-4 of the README: link layer, ethertype, fixed IP header, header chain."""
    if len(frame) < ETH_HLEN:
        return Parsed(UNREADABLE, note="shorter than Ethernet")
    ethertype, off, tags = _be16(frame, 12), ETH_HLEN, 0
    while ethertype in VLAN_TPIDS:
        if tags == MAX_VLAN_TAGS:
            return Parsed(UNREADABLE, note="third VLAN tag")
        if len(frame) < off + 4:
            return Parsed(UNREADABLE, note="truncated VLAN tag")
        ethertype, off, tags = _be16(frame, off + 2), off + 4, tags + 1
    if ethertype == ETH_IP:
        return _ipv4(frame, off)
    if ethertype == ETH_IPV6:
        return _ipv6(frame, off)
    return Parsed(NON_IP, ethertype=ethertype)


def _ipv4(frame: bytes, off: int) -> Parsed:
    avail = len(frame) - off
    if avail < 20 or frame[off] >> 4 != 4:
        return Parsed(UNREADABLE, ETH_IP, note="no IPv4 header")
    src = ipaddress.IPv4Address(frame[off + 12 : off + 16])
    ihl, total, proto = frame[off] & 0xF, _be16(frame, off + 2), frame[off + 9]
    if ihl < 5 or total < ihl * 4 or total > avail:
        return Parsed(INCOMPLETE, ETH_IP, src, note=f"ihl {ihl}, total length {total}")
    pkt = frame[off : off + total]  # padding beyond the IP packet is never read
    frag = _be16(frame, off + 6)
    offset, more = frag & 0x1FFF, bool(frag & 0x2000)
    if offset == 1:
        return Parsed(BAD_FRAGMENT, ETH_IP, src, bad="frag_overlap")
    if offset >= 2:
        return Parsed(NON_FIRST, ETH_IP, src, proto=proto)
    hlen = ihl * 4
    if more and ((proto == TCP and total - hlen < 20) or (proto == UDP and total - hlen < 8)):
        return Parsed(BAD_FRAGMENT, ETH_IP, src, bad="frag_tiny")
    return _transport(pkt, hlen, proto, ETH_IP, src, False)


def _ipv6(frame: bytes, off: int) -> Parsed:
    avail = len(frame) - off
    if avail < 40 or frame[off] >> 4 != 6:
        return Parsed(UNREADABLE, ETH_IPV6, note="no IPv6 header")
    src = ipaddress.IPv6Address(frame[off + 8 : off + 24])
    plen = _be16(frame, off + 4)
    if 40 + plen > avail:
        return Parsed(INCOMPLETE, ETH_IPV6, src, note=f"payload length {plen}")
    pkt = frame[off : off + 40 + plen]
    nexthdr, pos, walked = frame[off + 6], 40, 0
    first_fragment = has_fragment = False

    def unreadable_chain(why: str) -> Parsed:
        if first_fragment:
            return Parsed(BAD_FRAGMENT, ETH_IPV6, src, bad="frag_chain", note=why)
        return Parsed(INCOMPLETE, ETH_IPV6, src, note=why)

    while nexthdr in (HOPOPTS, ROUTING, FRAGMENT, DSTOPTS, AH):
        if walked == MAX_EXT_HEADERS:
            if first_fragment and not FIRST_FRAG_BOUND_IS_FRAG_CHAIN:
                return Parsed(INCOMPLETE, ETH_IPV6, src, note="17th extension header")
            return unreadable_chain("17th extension header")
        walked += 1
        if nexthdr == FRAGMENT:
            if pos + 8 > len(pkt):
                return unreadable_chain(f"Fragment header #{walked} cut")
            has_fragment = True
            field_ = _be16(pkt, pos + 2)
            offset, more = field_ >> 3, bool(field_ & 1)
            if offset:
                if first_fragment and NESTED_NONFIRST_IS_FRAG_CHAIN:
                    return unreadable_chain("non-first Fragment header after a first one")
                return Parsed(NON_FIRST, ETH_IPV6, src, proto=pkt[pos],
                              has_fragment_header=True)
            first_fragment = first_fragment or more
            nexthdr, pos = pkt[pos], pos + 8
            continue
        if pos + 2 > len(pkt):
            return unreadable_chain(f"extension header #{walked} cut before its length")
        hdrlen = pkt[pos + 1]
        size = (hdrlen + 2) * 4 if nexthdr == AH else (hdrlen + 1) * 8
        if pos + size > len(pkt):
            return unreadable_chain(f"extension header #{walked} ({size} bytes) cut")
        nexthdr, pos = pkt[pos], pos + size
    parsed = _transport(pkt, pos, nexthdr, ETH_IPV6, src, has_fragment)
    if parsed.outcome == INCOMPLETE and first_fragment:
        return unreadable_chain(parsed.note)
    return parsed


def _transport(pkt: bytes, pos: int, proto: int, ethertype: int, src: Address,
               has_fragment: bool) -> Parsed:
    left = len(pkt) - pos
    dport = None
    if proto == TCP:
        if left < 20:
            return Parsed(INCOMPLETE, ethertype, src, note=f"TCP header cut at {left}")
        doff = pkt[pos + 12] >> 4
        if doff < 5 or doff * 4 > left:
            return Parsed(INCOMPLETE, ethertype, src, note=f"TCP doff {doff}, {left} bytes")
        dport = _be16(pkt, pos + 2)
    elif proto == UDP:
        if left < 8:
            return Parsed(INCOMPLETE, ethertype, src, note=f"UDP header cut at {left}")
        dport = _be16(pkt, pos + 2)
    return Parsed(COMPLETE, ethertype, src, proto=proto, dport=dport,
                  has_fragment_header=has_fragment, next_byte=pkt[pos] if left > 0 else None)


# -- deciding -------------------------------------------------------------------------------


def _rule_proto(rule: Rule) -> int | None:
    if rule.proto is None:
        return None
    if rule.proto == "icmp":
        return ICMP if rule.network.version == 4 else ICMPV6  # "icmp" is ICMPv6 on IPv6
    return {"tcp": TCP, "udp": UDP}[rule.proto]


def _specificity(rule: Rule) -> int:
    return 2 if rule.dport is not None else 1 if rule.proto is not None else 0


@dataclass
class Model:
    """The verdict and reason the contract gives a frame, under one rule set and interface."""

    rules: list[Rule]
    iface: Iface = field(default_factory=Iface)

    def __post_init__(self) -> None:
        self._decided: dict[tuple, Rule | None] = {}
        self._strictest: dict[Address, str] = {}

    def verdict(self, frame: bytes) -> tuple[str, str]:
        return self.decide(parse(frame))

    def decide(self, p: Parsed) -> tuple[str, str]:
        iface = self.iface
        if p.outcome == UNREADABLE:
            return _unparsed(iface.unparsed_policy)
        if p.outcome == NON_IP:
            if iface.policy == "pass":
                return PASS, "policy_pass"
            if p.ethertype == ETH_ARP and not iface.guard_l2:
                return PASS, "l2_exempt_pass"
            return DROP, "policy_drop"
        if p.outcome == BAD_FRAGMENT:
            assert p.bad is not None
            return DROP, p.bad
        assert p.src is not None
        if p.outcome == INCOMPLETE:
            if iface.unparsed_policy == "drop":
                return DROP, "unparsed_drop"
            return _unparsed(self.strictest(p.src))
        assert p.proto is not None
        dport = p.dport if p.outcome == COMPLETE else None  # port rules never match fragments
        rule = self.match(p.src, p.proto, dport)
        if rule is not None:
            return (PASS, "rule_pass") if rule.action == "pass" else (DROP, "rule_drop")
        if iface.policy == "pass":
            return PASS, "policy_pass"
        if (not iface.guard_l2 and p.outcome == COMPLETE and p.src.version == 6
                and not p.has_fragment_header and p.proto == ICMPV6
                and p.next_byte in ND_TYPES):
            return PASS, "l2_exempt_pass"
        return DROP, "policy_drop"

    def match(self, src: Address, proto: int, dport: int | None) -> Rule | None:
        """The deciding rule: longest prefix among the matching rules, then the most specific
        (proto+port over proto over any). dport None: the packet has no ports."""
        key = (src, proto, dport)
        if key not in self._decided:
            matching = [
                r for r in self.rules
                if src in r.network
                and (r.proto is None or _rule_proto(r) == proto)
                and (r.dport is None or r.dport == dport)
            ]
            self._decided[key] = max(
                matching, key=lambda r: (r.network.prefixlen, _specificity(r)), default=None
            )
        return self._decided[key]

    def strictest(self, src: Address) -> str:
        """drop if any complete packet from `src`, over all protocols and ports, would be
        dropped; else pass. Brute force: every protocol a rule names plus one none does, and
        every port a rule names plus one none does."""
        if src not in self._strictest:
            protos = {TCP, UDP, ICMP, ICMPV6, 255} | {_rule_proto(r) or 0 for r in self.rules}
            ports = {r.dport for r in self.rules if r.dport is not None} | {None}
            verdicts = set()
            for proto in protos:
                for dport in ports if proto in (TCP, UDP) else [None]:
                    rule = self.match(src, proto, dport)
                    verdicts.add(rule.action if rule else self.iface.policy)
            if STRICTEST_COUNTS_SHADOWED_RULES:
                verdicts |= {r.action for r in self.rules if src in r.network}
            self._strictest[src] = "drop" if "drop" in verdicts else "pass"
        return self._strictest[src]


def _unparsed(policy: str) -> tuple[str, str]:
    return (DROP, "unparsed_drop") if policy == "drop" else (PASS, "unparsed_pass")
