"""A seeded generator of adversarial frames, and the rule sets they are run against.

Every frame is built field by field here (not through tests/packets.py, which fixes lengths
and pads to 60 bytes): the point is to get lengths, offsets and counts wrong in every way the
parser must survive. Sources come mostly from the prefixes of the scenario under test, so that
rules decide; destination ports mostly from its rules' ports.

    gen = PacketGen(seed, scenario)
    for shape, frame in gen.frames(1000): ...

`shape` names the family of frame (e.g. "v6ext/frag0M/trunc"), for mismatch reports.
"""

from __future__ import annotations

import ipaddress
import random
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from tests.packet_model import (
    AH,
    DSTOPTS,
    ETH_ARP,
    ETH_IP,
    ETH_IPV6,
    FRAGMENT,
    HOPOPTS,
    ICMP,
    ICMPV6,
    ROUTING,
    TCP,
    UDP,
    Iface,
    Rule,
)

MACS = bytes.fromhex("020000000002" "020000000001")
TPIDS = (0x8100, 0x88A8)
EXT_KINDS = (HOPOPTS, ROUTING, FRAGMENT, DSTOPTS, AH)
ODD_PROTOS = (50, 59, 255, 0, 47, 132, 41, 4, 2)  # ESP, no next header, ..., IPv6-in-IPv4
OTHER_ETHERTYPES = (0x8847, 0x8864, 0x88CC, 0x9100, 0x0000, 0xFFFF, 0x0805, 0x8035, 0x05DC)
WELL_KNOWN_PORTS = (22, 23, 53, 80, 443, 8080)
# BPF_PROG_TEST_RUN refuses frames shorter than an Ethernet header (EINVAL), so the cuts
# inside it cannot be run; frames stay within one page so the program sees all of them.
MIN_FRAME, MAX_FRAME = 14, 1514
FALLBACK_V4 = ("203.0.113.0/24",)
FALLBACK_V6 = ("2001:db8:ffff::/48", "fe80::/64")


@dataclass(frozen=True)
class Scenario:
    name: str
    rules: tuple[Rule, ...]
    iface: Iface = field(default_factory=Iface)


def _r(prefix: str, action: str = "drop", proto: str | None = None, dport: int | None = None
       ) -> Rule:
    return Rule(prefix, action, proto, dport)


SCENARIOS: tuple[Scenario, ...] = (
    Scenario("v4_24_drop", (_r("10.208.0.0/24"),)),
    Scenario("v4_24_drop_tcp22", (_r("10.208.0.0/24", "drop", "tcp", 22),)),
    Scenario("allowlist_policy_drop", (
        _r("192.0.2.0/24", "pass", "tcp", 80),
        _r("198.51.100.7/32", "pass"),
        _r("2001:db8:80::/48", "pass", "tcp", 80),
        _r("fe80::/64", "drop", "icmp"),  # explicit rules still apply to ND
    ), Iface(policy="drop")),
    Scenario("nested_v4", (
        _r("10.0.0.0/8"),
        _r("10.1.0.0/16", "pass", "tcp", 443),
        _r("10.1.2.0/24", "drop", "udp"),
    )),
    Scenario("v6_64_drop_128_pass", (
        _r("2001:db8:bad:1::/64"),
        _r("2001:db8:bad:1::7/128", "pass"),
    )),
    Scenario("overlap_v4_v6", (  # least specific first: list order must not decide
        _r("0.0.0.0/0", "drop", "tcp", 23),
        _r("10.0.0.0/8", "drop", "icmp"),
        _r("10.0.0.0/8", "drop", "tcp"),
        _r("10.0.0.0/8", "pass", "tcp", 22),
        _r("10.7.0.0/16", "pass"),
        _r("192.0.2.0/24", "drop"),
        _r("192.0.2.0/24", "pass", "tcp"),
        _r("192.0.2.0/24", "drop", "tcp", 23),
        _r("::/0", "drop", "udp", 53),
        _r("2001:db8::/32", "drop", "icmp"),
        _r("2001:db8:1::/48", "pass"),
        _r("2001:db8:1:2::/64", "drop", "tcp", 22),
    )),
    Scenario("icmp_drop_only", (  # the strictest verdict must look past TCP and UDP
        _r("198.51.100.0/24", "drop", "icmp"),
        _r("198.51.100.128/25", "pass", "tcp", 443),
        _r("2001:db8:1c::/48", "drop", "icmp"),
    )),
    Scenario("unparsed_drop", (
        _r("10.208.0.0/24", "pass"),
        _r("2001:db8:bad:1::/64", "drop", "udp", 53),
    ), Iface(unparsed_policy="drop")),
    Scenario("guard_l2_policy_drop", (
        _r("192.0.2.0/24", "pass"),
        _r("fe80::/64", "pass", "icmp"),
        _r("2001:db8:bad:1::/64", "pass", "udp", 53),
    ), Iface(policy="drop", guard_l2=True)),
    Scenario("nd_policy_drop", (
        _r("fe80::/64", "drop", "tcp"),
        _r("2001:db8:bad:1::/64", "pass", "tcp", 22),
        _r("10.208.0.0/24", "pass", "udp", 53),
    ), Iface(policy="drop")),
    Scenario("no_rules_all_drop", (), Iface(policy="drop", unparsed_policy="drop")),
)


# -- field-by-field builders ----------------------------------------------------------------


def eth(ethertype: int, payload: bytes, tpids: tuple[int, ...] = ()) -> bytes:
    """tpids: the VLAN tags' TPIDs, outermost first; any number of them."""
    types = (*tpids, ethertype)
    tags = b"".join(struct.pack("!HH", 100 + i, types[i + 1]) for i in range(len(tpids)))
    return MACS + struct.pack("!H", types[0]) + tags + payload


def ipv4(src: bytes, proto: int, payload: bytes, ihl: int = 5, total: int | None = None,
         frag: int = 0, options: bytes | None = None, version: int = 4) -> bytes:
    opts = options if options is not None else b"\x01" * max(0, ihl * 4 - 20)
    length = 20 + len(opts) + len(payload) if total is None else total
    hdr = struct.pack("!BBHHHBBH4s4s", (version << 4) | ihl, 0, length & 0xFFFF, 7, frag, 64,
                      proto, 0, src, bytes([192, 0, 2, 1]))
    return hdr + opts + payload


def ipv6(src: bytes, nexthdr: int, payload: bytes, plen: int | None = None,
         version: int = 6) -> bytes:
    length = len(payload) if plen is None else plen
    dst = ipaddress.IPv6Address("2001:db8::1").packed
    return struct.pack("!IHBB", version << 28, length & 0xFFFF, nexthdr, 64) + src + dst + payload


def tcp(dport: int, doff: int = 5, payload: bytes = b"") -> bytes:
    opts = b"\x01" * max(0, doff * 4 - 20)
    return struct.pack("!HHIIBBHHH", 40000, dport, 1, 0, doff << 4, 0x02, 65535, 0, 0) + opts \
        + payload


def udp(dport: int, payload: bytes = b"") -> bytes:
    return struct.pack("!HHHH", 40000, dport, 8 + len(payload), 0) + payload


def icmp(icmp_type: int, size: int = 8) -> bytes:
    return struct.pack("!BBHHH", icmp_type, 0, 0, 1, 1)[:size]


def ext(kind: int, nexthdr: int, hdrlen: int = 0, frag_offset: int = 0, more: bool = False
        ) -> bytes:
    """One IPv6 extension header. `hdrlen` is written as given, and the header is as long as
    it says (so a huge hdrlen makes a huge header, unless the caller cuts it)."""
    if kind == FRAGMENT:
        return struct.pack("!BBHI", nexthdr, 0, (frag_offset << 3) | more, 0x1234)
    size = (hdrlen + 2) * 4 if kind == AH else (hdrlen + 1) * 8
    pad = b"\0" * (size - 2) if kind == AH else bytes([1, min(size - 4, 255)]) + b"\0" * (size - 4)
    return bytes([nexthdr, hdrlen]) + pad[: size - 2]


# -- the generator --------------------------------------------------------------------------


class PacketGen:
    """Adversarial frames for one scenario, from one seed: the same seed, the same frames."""

    def __init__(self, seed: int | str, scenario: Scenario) -> None:
        self.rng = random.Random(f"{seed}:{scenario.name}")
        nets = [ipaddress.ip_network(r.prefix) for r in scenario.rules]
        self.v4 = [n for n in nets if n.version == 4] or [
            ipaddress.ip_network(p) for p in FALLBACK_V4]
        self.v6 = [n for n in nets if n.version == 6] or [
            ipaddress.ip_network(p) for p in FALLBACK_V6]
        # Families with rules get most of the packets: that is where the rules are.
        fams = {n.version for n in nets} or {4, 6}
        self.p_v6 = 0.5 if len(fams) == 2 else 0.8 if fams == {6} else 0.2
        self.ports = sorted({r.dport for r in scenario.rules if r.dport} or {22})
        self.shapes: list[tuple[int, Callable[[], tuple[str, bytes]]]] = [
            (10, self.valid),
            (12, self.truncated),
            (8, self.short_ip_length),
            (6, self.vlan),
            (8, self.ipv4_header),
            (10, self.ipv4_fragment),
            (6, self.tcp_doff),
            (12, self.ipv6_chain),
            (8, self.ipv6_fragment),
            (4, self.ipv6_payload_length),
            (4, self.odd_proto),
            (6, self.icmp_short),
            (4, self.non_ip),
            (8, self.bit_flip),
        ]
        self._weights = [w for w, _ in self.shapes]

    def frames(self, count: int) -> Iterator[tuple[str, bytes]]:
        for _ in range(count):
            shape = self.rng.choices(self.shapes, self._weights)[0][1]
            name, frame = shape()
            if self.rng.random() < 0.3:  # Ethernet padding, often shaped like a header
                name, frame = name + "+pad", frame + self.padding()
            if len(frame) > MAX_FRAME:
                name, frame = name + "+clip", frame[:MAX_FRAME]
            yield name, frame

    # -- fields ---------------------------------------------------------------------------

    def chance(self, p: float) -> bool:
        return self.rng.random() < p

    def src(self, version: int) -> bytes:
        """Mostly inside a rule's prefix (often at its edges), sometimes just outside one,
        sometimes anywhere."""
        rng = self.rng
        net = rng.choice(self.v4 if version == 4 else self.v6)
        bits = 32 if version == 4 else 128
        first, last = int(net.network_address), int(net.broadcast_address)
        roll = rng.random()
        if roll < 0.6:
            addr = rng.randint(first, last)
        elif roll < 0.75:
            addr = rng.choice((first, last, min(last, first + 7)))
        elif roll < 0.9:
            addr = rng.choice((first - 1, last + 1)) % (1 << bits)
        else:
            addr = rng.getrandbits(bits)
        return addr.to_bytes(bits // 8, "big")

    def dport(self) -> int:
        roll = self.rng.random()
        if roll < 0.6:
            return self.rng.choice(self.ports)
        if roll < 0.8:
            return self.rng.choice(WELL_KNOWN_PORTS)
        return self.rng.choice((0, 1, 65535, self.rng.randint(0, 65535)))

    def version(self) -> int:
        return 6 if self.chance(self.p_v6) else 4

    def tpids(self, most: int = 2) -> tuple[int, ...]:
        n = self.rng.choice((0, 0, 0, 1, 2)) if most == 2 else self.rng.randint(0, most)
        return tuple(self.rng.choice(TPIDS) for _ in range(n))

    def transport(self, proto: int) -> bytes:
        """A well-formed transport header (or ICMP/odd payload) for `proto`."""
        if proto == TCP:
            return tcp(self.dport(), payload=self.rng.randbytes(self.rng.choice((0, 0, 4, 30))))
        if proto == UDP:
            return udp(self.dport(), self.rng.randbytes(self.rng.choice((0, 4, 20))))
        if proto in (ICMP, ICMPV6):
            types = (8, 0, 3) if proto == ICMP else (128, 129, 1, *range(133, 138))
            return icmp(self.rng.choice(types))
        return self.rng.randbytes(self.rng.choice((0, 1, 8, 24)))

    def l4proto(self, version: int) -> int:
        icmp_p = ICMP if version == 4 else ICMPV6
        return self.rng.choice((TCP, TCP, UDP, UDP, icmp_p, icmp_p, self.rng.choice(ODD_PROTOS)))

    def packet(self, version: int, proto: int, l4: bytes, tpids: tuple[int, ...] = ()) -> bytes:
        if version == 4:
            return eth(ETH_IP, ipv4(self.src(4), proto, l4), tpids)
        return eth(ETH_IPV6, ipv6(self.src(6), proto, l4), tpids)

    def padding(self) -> bytes:
        """Trailing bytes beyond the IP packet: zeros, noise, or a header they must not be
        read as."""
        pick = self.rng.randrange(4)
        if pick == 0:
            return bytes(self.rng.randint(1, 40))
        if pick == 1:
            return self.rng.randbytes(self.rng.randint(1, 40))
        if pick == 2:
            return tcp(self.dport())
        return udp(self.dport()) + icmp(135)

    # -- shapes ---------------------------------------------------------------------------

    def valid(self) -> tuple[str, bytes]:
        v = self.version()
        proto = self.l4proto(v)
        return f"valid/v{v}/p{proto}", self.packet(v, proto, self.transport(proto),
                                                    self.tpids())

    def any_frame(self) -> tuple[str, bytes]:
        """A frame from any of the structured shapes (not bit flips or truncations)."""
        shape = self.rng.choice((self.valid, self.vlan, self.ipv4_header, self.ipv4_fragment,
                                 self.tcp_doff, self.ipv6_chain, self.ipv6_fragment,
                                 self.icmp_short, self.non_ip, self.odd_proto))
        return shape()

    def truncated(self) -> tuple[str, bytes]:
        """The frame cut at any byte: every truncation point of every header over a run."""
        name, frame = self.any_frame()
        cut = self.rng.randint(min(len(frame), MIN_FRAME), len(frame))
        return f"{name}/cut", frame[:cut]

    def short_ip_length(self) -> tuple[str, bytes]:
        """A full frame whose IP length ends the packet early (inside the headers): the bytes
        after it are padding that look like the rest of the packet."""
        name, frame = self.any_frame()
        for off in (14, 18, 22):
            et = int.from_bytes(frame[off - 2 : off], "big") if len(frame) >= off else None
            if et == ETH_IP and len(frame) >= off + 20:
                total = int.from_bytes(frame[off + 2 : off + 4], "big")
                new = self.rng.randint(0, max(0, min(total, len(frame) - off)))
                return f"{name}/iplen", _put16(frame, off + 2, new)
            if et == ETH_IPV6 and len(frame) >= off + 40:
                plen = int.from_bytes(frame[off + 4 : off + 6], "big")
                new = self.rng.randint(0, max(0, min(plen, len(frame) - off - 40)))
                return f"{name}/plen", _put16(frame, off + 4, new)
            if et not in TPIDS:
                break
        return f"{name}/iplen-none", frame

    def vlan(self) -> tuple[str, bytes]:
        v = self.version()
        proto = self.l4proto(v)
        tpids = self.tpids(most=3)
        if self.chance(0.15):
            return f"vlan{len(tpids)}/arp", eth(ETH_ARP, self.arp_body(), tpids)
        return f"vlan{len(tpids)}/v{v}", self.packet(v, proto, self.transport(proto), tpids)

    def ipv4_header(self) -> tuple[str, bytes]:
        """ihl 0-15 with options, and total lengths that are right, short, long, or smaller
        than the header."""
        rng = self.rng
        ihl = rng.randint(0, 15)
        proto = self.l4proto(4)
        l4 = self.transport(proto)
        opts = rng.randbytes(max(0, ihl * 4 - 20)) if self.chance(0.5) else None
        exact = 20 + max(0, ihl * 4 - 20) + len(l4)
        which = rng.choice(("exact", "exact", "short", "long", "below_ihl", "zero"))
        total = {
            "exact": exact,
            "short": rng.randint(max(0, exact - 24), exact),
            "long": exact + rng.randint(1, 64),
            "below_ihl": rng.randint(0, max(0, ihl * 4 - 1)),
            "zero": 0,
        }[which]
        version = 4 if self.chance(0.95) else rng.choice((0, 5, 6, 15))
        ip = ipv4(self.src(4), proto, l4, ihl=ihl, total=total, options=opts, version=version)
        return f"v4hdr/ihl{ihl}/{which}", eth(ETH_IP, ip, self.tpids())

    def ipv4_fragment(self) -> tuple[str, bytes]:
        """Offsets 0/1/2/large, MF on/off, DF sometimes; tiny first fragments of 0-24 bytes."""
        rng = self.rng
        offset = rng.choice((0, 0, 0, 1, 1, 2, 3, rng.randint(4, 0x1FFE), 0x1000, 0x1001,
                             0x1FFF))
        more = self.chance(0.6)
        flags = (0x2000 if more else 0) | (0x4000 if self.chance(0.2) else 0) \
            | (0x8000 if self.chance(0.05) else 0)
        proto = rng.choice((TCP, TCP, UDP, UDP, ICMP, rng.choice(ODD_PROTOS)))
        l4 = self.transport(proto)
        if proto == TCP and self.chance(0.2):  # a data offset the 20 bytes do not cover
            l4 = l4[:12] + bytes([rng.randint(0, 15) << 4]) + l4[13:]
        if self.chance(0.6):  # tiny, often right at the UDP and TCP thresholds
            l4 = l4[: rng.choice((rng.randint(0, 24), 7, 8, 19, 20))]
        ihl = rng.choice((5, 5, 5, 6, 15))
        ip = ipv4(self.src(4), proto, l4, ihl=ihl, frag=flags | offset)
        return (f"v4frag/off{min(offset, 4)}/{'MF' if more else 'last'}/p{proto}",
                eth(ETH_IP, ip, self.tpids()))

    def tcp_doff(self) -> tuple[str, bytes]:
        rng = self.rng
        v = self.version()
        doff = rng.randint(0, 15)
        hdr = tcp(self.dport(), doff=min(doff, 5))
        hdr = hdr[:12] + bytes([doff << 4]) + hdr[13:]
        body = hdr + rng.randbytes(rng.choice((0, 4, 8, rng.randint(0, 60))))
        return f"tcpdoff/v{v}/doff{doff}", self.packet(v, TCP, body, self.tpids())

    def ipv6_chain(self) -> tuple[str, bytes]:
        """0-20 extension headers of every kind, Fragment headers at offsets 0/1/large with
        M on/off, hdrlen up to 255, ending in any protocol; sometimes cut."""
        rng = self.rng
        count = rng.choice((0, 1, 2, 3, rng.randint(0, 20), rng.randint(14, 18)))
        kinds = [rng.choice(EXT_KINDS) for _ in range(count)]
        if count and self.chance(0.2):
            kinds = [rng.choice(EXT_KINDS)] * count
        if self.chance(0.15):  # right at the bound: 15-18 small headers, no Fragment
            count = rng.randint(15, 18)
            kinds = [rng.choice((HOPOPTS, ROUTING, DSTOPTS, AH)) for _ in range(count)]
        final = self.l4proto(6)
        chain = [*kinds, final]
        body, tags = b"", []
        small = self.chance(0.5)  # keeps long chains inside one frame
        for i, kind in enumerate(kinds):
            hdrlen = rng.choice((0, 0, 0, 1, 2, 0 if small else rng.randint(0, 255)))
            if kind == FRAGMENT:
                off = rng.choice((0, 0, 1, 2, rng.randint(3, 0x1FFF)))
                more = self.chance(0.5)
                tags.append(f"F{'0' if off == 0 else 'n'}{'M' if more else ''}")
                body += ext(kind, chain[i + 1], frag_offset=off, more=more)
            else:
                tags.append(str(kind))
                body += ext(kind, chain[i + 1], hdrlen=hdrlen)
        body += self.transport(final)
        frame = eth(ETH_IPV6, ipv6(self.src(6), chain[0], body), self.tpids())
        name = f"v6ext/n{count}/{'-'.join(tags[:4])}/p{final}"
        if self.chance(0.3):  # cut the frame (payload length now too long)...
            frame = frame[: rng.randint(MIN_FRAME, len(frame))]
            name += "/cut"
        elif self.chance(0.3):  # ...or the packet, keeping the bytes as padding
            off = _ip_offset(frame)
            plen = rng.randint(0, len(frame) - off - 40)
            frame = _put16(frame, off + 4, plen)
            name += "/plen"
        return name, frame

    def ipv6_fragment(self) -> tuple[str, bytes]:
        """A Fragment header (offset 0/1/2/large, M on/off) between short chains, then a
        transport header of 0-24 bytes: first fragments whose chain stops before the
        transport header, tiny ones, atomic ones, later ones."""
        rng = self.rng
        before = [rng.choice((HOPOPTS, DSTOPTS, ROUTING, AH))
                  for _ in range(rng.choice((0, 0, 1, 2)))]
        after = [rng.choice((DSTOPTS, ROUTING, AH, FRAGMENT))
                 for _ in range(rng.choice((0, 0, 0, 1, 3)))]
        final = rng.choice((TCP, TCP, UDP, UDP, ICMPV6, rng.choice(ODD_PROTOS)))
        chain = [*before, FRAGMENT, *after, final]
        offset = rng.choice((0, 0, 0, 1, 2, rng.randint(3, 0x1FFF)))
        more = self.chance(0.7)
        body, frag_at = b"", 0
        for i, kind in enumerate(chain[:-1]):
            if kind == FRAGMENT and i == len(before):
                frag_at = len(body)
                body += ext(FRAGMENT, chain[i + 1], frag_offset=offset, more=more)
            elif kind == FRAGMENT:  # a second one: atomic, or later in another datagram
                body += ext(FRAGMENT, chain[i + 1], frag_offset=rng.choice((0, 0, 5)),
                            more=self.chance(0.5))
            else:
                body += ext(kind, chain[i + 1], hdrlen=rng.choice((0, 0, 1)))
        l4 = self.transport(final)
        tiny = self.chance(0.6)
        body += l4[: rng.randint(0, 24)] if tiny else l4
        name = (f"v6frag/{len(before)}+F{min(offset, 3)}{'M' if more else ''}+{len(after)}"
                f"/p{final}{'/tiny' if tiny else ''}")
        if self.chance(0.1):  # the packet ends inside the first Fragment header
            body = body[: frag_at + rng.randint(0, 7)]
            name += "/fcut"
        frame = eth(ETH_IPV6, ipv6(self.src(6), chain[0], body), self.tpids())
        return name, frame

    def ipv6_payload_length(self) -> tuple[str, bytes]:
        rng = self.rng
        proto = self.l4proto(6)
        body = self.transport(proto)
        plen = rng.choice((0, len(body) + rng.randint(1, 100), rng.randint(0, len(body)),
                           0xFFFF))
        return f"v6plen/p{proto}", eth(ETH_IPV6, ipv6(self.src(6), proto, body, plen=plen),
                                       self.tpids())

    def odd_proto(self) -> tuple[str, bytes]:
        v = self.version()
        proto = self.rng.choice((*ODD_PROTOS, ICMPV6 if v == 4 else ICMP))
        return f"odd/v{v}/p{proto}", self.packet(v, proto, self.transport(proto), self.tpids())

    def icmp_short(self) -> tuple[str, bytes]:
        """ICMP and ICMPv6 of 0-8 bytes, including the ND types."""
        v = self.version()
        proto = ICMP if v == 4 else ICMPV6
        t = self.rng.choice((8, 128, 1, 133, 134, 135, 136, 137, 138, 132))
        size = self.rng.randint(0, 8)
        return f"icmp/v{v}/t{t}/len{size}", self.packet(v, proto, icmp(t, size), self.tpids())

    def arp_body(self) -> bytes:
        body = struct.pack("!HHBBH", 1, ETH_IP, 6, 4, 1) + MACS[6:] + self.src(4) + b"\0" * 6 \
            + bytes([192, 0, 2, 1])
        return body[: self.rng.choice((len(body), len(body), 0, self.rng.randint(0, 27)))]

    def non_ip(self) -> tuple[str, bytes]:
        """ARP (full or cut), other ethertypes, and IP ethertypes with the wrong version."""
        rng = self.rng
        roll = rng.random()
        if roll < 0.5:
            return "nonip/arp", eth(ETH_ARP, self.arp_body(), self.tpids())
        if roll < 0.8:
            et = rng.choice(OTHER_ETHERTYPES)
            return f"nonip/{et:04x}", eth(et, rng.randbytes(rng.randint(0, 60)), self.tpids())
        v = self.version()  # an IP ethertype carrying the other version
        proto = self.l4proto(v)
        frame = self.packet(v, proto, self.transport(proto), self.tpids())
        swapped = ETH_IPV6 if v == 4 else ETH_IP
        off = _ip_offset(frame)
        return f"nonip/v{v}-as-other", _put16(frame, off - 2, swapped)

    def bit_flip(self) -> tuple[str, bytes]:
        """A frame with 1-4 bits flipped, mostly in its first 80 bytes (the headers)."""
        name, frame = self.any_frame()
        if not frame:
            return f"{name}/flip", frame
        buf = bytearray(frame)
        for _ in range(self.rng.randint(1, 4)):
            at = self.rng.randrange(min(len(buf), 80) if self.chance(0.9) else len(buf))
            buf[at] ^= 1 << self.rng.randrange(8)
        return f"{name}/flip", bytes(buf)


def _put16(frame: bytes, at: int, value: int) -> bytes:
    return frame[:at] + struct.pack("!H", value & 0xFFFF) + frame[at + 2 :]


def _ip_offset(frame: bytes) -> int:
    """Where the IP header starts in a frame these builders made (after any VLAN tags)."""
    off = 14
    while int.from_bytes(frame[off - 2 : off], "big") in TPIDS:
        off += 4
    return off
