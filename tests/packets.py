"""Hand-built frames for BPF_PROG_TEST_RUN: every header field explicit, nothing hidden."""

from __future__ import annotations

import socket
import struct

SRC_MAC = bytes.fromhex("020000000001")
DST_MAC = bytes.fromhex("020000000002")
ETH_IP, ETH_IPV6, ETH_ARP, ETH_8021Q, ETH_8021AD = 0x0800, 0x86DD, 0x0806, 0x8100, 0x88A8
TCP, UDP, ICMP, ICMPV6 = 6, 17, 1, 58
HOPOPTS, ROUTING, FRAGMENT, DSTOPTS, AH = 0, 43, 44, 60, 51


def eth(ethertype: int, payload: bytes, vlans: tuple[int, ...] = ()) -> bytes:
    """vlans: outermost first; the outer one of two uses 802.1ad."""
    tags = b""
    types = [ETH_8021AD if len(vlans) > 1 and i == 0 else ETH_8021Q for i in range(len(vlans))]
    first = types[0] if vlans else ethertype
    for i, vid in enumerate(vlans):
        inner = types[i + 1] if i + 1 < len(vlans) else ethertype
        tags += struct.pack("!HH", vid, inner)
    frame = DST_MAC + SRC_MAC + struct.pack("!H", first) + tags + payload
    return frame + b"\0" * max(0, 60 - len(frame))


def l4(proto: int, dport: int = 0, sport: int = 40000, doff: int = 5) -> bytes:
    if proto == TCP:
        return struct.pack("!HHIIBBHHH", sport, dport, 1, 0, doff << 4, 0x02, 65535, 0, 0)
    if proto == UDP:
        return struct.pack("!HHHH", sport, dport, 8, 0)
    return struct.pack("!BBHHH", 8 if proto == ICMP else 128, 0, 0, 1, 1)  # echo request


def ipv4(src: str, dst: str, proto: int, payload: bytes, ihl: int = 5, frag: int = 0) -> bytes:
    options = b"\x01" * (ihl * 4 - 20) if ihl > 5 else b""
    hdr = struct.pack(
        "!BBHHHBBH4s4s",
        (4 << 4) | ihl,
        0,
        20 + len(options) + len(payload),
        1,
        frag,
        64,
        proto,
        0,
        socket.inet_aton(src),
        socket.inet_aton(dst),
    )
    return hdr + options + payload


def ipv6(src: str, dst: str, nexthdr: int, payload: bytes) -> bytes:
    return (
        struct.pack("!IHBB", 6 << 28, len(payload), nexthdr, 64)
        + socket.inet_pton(socket.AF_INET6, src)
        + socket.inet_pton(socket.AF_INET6, dst)
        + payload
    )


def ext(nexthdr: int, kind: int, frag_offset: int = 0) -> bytes:
    """One IPv6 extension header of the given kind, followed by `nexthdr`."""
    if kind == FRAGMENT:
        return struct.pack("!BBHI", nexthdr, 0, frag_offset << 3, 7)
    if kind == AH:
        return struct.pack("!BBHII", nexthdr, 2, 0, 1, 1) + b"\0" * 4  # (2+2)*4 = 16 bytes
    return struct.pack("!BB", nexthdr, 0) + b"\x01\x04\0\0\0\0"  # 8 bytes, PadN


def tcp4(src: str, dport: int, dst: str = "192.0.2.1", **kw) -> bytes:
    return eth(ETH_IP, ipv4(src, dst, TCP, l4(TCP, dport)), **kw)


def udp4(src: str, dport: int, dst: str = "192.0.2.1", **kw) -> bytes:
    return eth(ETH_IP, ipv4(src, dst, UDP, l4(UDP, dport)), **kw)


def icmp4(src: str, dst: str = "192.0.2.1", **kw) -> bytes:
    return eth(ETH_IP, ipv4(src, dst, ICMP, l4(ICMP)), **kw)


def tcp6(src: str, dport: int, dst: str = "2001:db8::1", **kw) -> bytes:
    return eth(ETH_IPV6, ipv6(src, dst, TCP, l4(TCP, dport)), **kw)


def udp6(src: str, dport: int, dst: str = "2001:db8::1") -> bytes:
    return eth(ETH_IPV6, ipv6(src, dst, UDP, l4(UDP, dport)))


def icmp6(src: str, icmp_type: int = 128, dst: str = "2001:db8::1") -> bytes:
    return eth(ETH_IPV6, ipv6(src, dst, ICMPV6, struct.pack("!BBHI", icmp_type, 0, 0, 0)))


def arp(sender: str) -> bytes:
    body = struct.pack("!HHBBH", 1, ETH_IP, 6, 4, 1) + SRC_MAC + socket.inet_aton(sender)
    return eth(ETH_ARP, body + b"\0" * 6 + socket.inet_aton("192.0.2.1"))
