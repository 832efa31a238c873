"""Frames the Linux stack accepts (valid checksums), in the shapes attackers use: IPv6
extension-header chains, IPv6 and IPv4 fragments split anywhere, IPv4 options.

Sent raw (AF_PACKET) from a test namespace by `send_and_sniff`, which also counts the
SYN-ACKs that come back, so a test can tell whether a SYN reached a listening socket.
"""

from __future__ import annotations

import json
import socket
import struct
import sys

from xdpfw.netns import run_in

TCP, UDP, DSTOPTS, FRAGMENT = 6, 17, 60, 44


def csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def _pseudo(src: str, dst: str, proto: int, length: int) -> bytes:
    if ":" in src:
        return (socket.inet_pton(socket.AF_INET6, src) + socket.inet_pton(socket.AF_INET6, dst)
                + struct.pack("!IxxxB", length, proto))
    return socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!xBH", proto, length)


def udp(src: str, dst: str, sport: int, dport: int, payload: bytes) -> bytes:
    hdr = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0)
    c = csum(_pseudo(src, dst, UDP, 8 + len(payload)) + hdr + payload) or 0xFFFF
    return hdr[:6] + struct.pack("!H", c) + payload


def tcp_syn(src: str, dst: str, sport: int, dport: int, options: bytes = b"",
            data: bytes = b"") -> bytes:
    """A SYN; `options` (a multiple of 4 bytes) makes its header longer than 20 bytes."""
    doff = 5 + len(options) // 4
    hdr = struct.pack("!HHIIBBHHH", sport, dport, 1000, 0, doff << 4, 0x02, 64240, 0, 0)
    seg = hdr + options + data
    c = csum(_pseudo(src, dst, TCP, len(seg)) + seg)
    return seg[:16] + struct.pack("!H", c) + seg[18:]


def ipv4(src: str, dst: str, proto: int, payload: bytes, ident: int = 0x208,
         frag: int = 0, options: bytes = b"") -> bytes:
    """frag: the 16-bit flags+offset field (0x2000 = MF, offset in 8-byte units)."""
    ihl = 5 + len(options) // 4
    hdr = struct.pack("!BBHHHBBH4s4s", (4 << 4) | ihl, 0, ihl * 4 + len(payload), ident, frag,
                      64, proto, 0, socket.inet_aton(src), socket.inet_aton(dst)) + options
    return hdr[:10] + struct.pack("!H", csum(hdr)) + hdr[12:] + payload


def ipv4_fragments(src: str, dst: str, proto: int, segment: bytes, cut: int,
                   ident: int = 0x208) -> list[bytes]:
    """The segment in two fragments, the first holding `cut` bytes (a multiple of 8)."""
    return [ipv4(src, dst, proto, segment[:cut], ident, 0x2000),
            ipv4(src, dst, proto, segment[cut:], ident, cut // 8)]


def ipv6(src: str, dst: str, nexthdr: int, payload: bytes) -> bytes:
    return (struct.pack("!IHBB", 6 << 28, len(payload), nexthdr, 64)
            + socket.inet_pton(socket.AF_INET6, src) + socket.inet_pton(socket.AF_INET6, dst)
            + payload)


def dstopts(nexthdr: int) -> bytes:
    """An 8-byte Destination Options header holding one PadN option."""
    return struct.pack("!BB", nexthdr, 0) + b"\x01\x04\0\0\0\0"


def chain(n: int, last: int) -> tuple[int, bytes]:
    """(first next-header value, n Destination Options headers ending in `last`)."""
    if n == 0:
        return last, b""
    return DSTOPTS, b"".join(dstopts(DSTOPTS if i < n - 1 else last) for i in range(n))


def ipv6_behind(src: str, dst: str, n: int, proto: int, l4: bytes) -> bytes:
    first, exts = chain(n, proto)
    return ipv6(src, dst, first, exts + l4)


def ipv6_fragments(src: str, dst: str, unfragmentable: tuple[int, bytes], first_next: int,
                   fragmentable: bytes, cut: int, ident: int = 0x208) -> list[bytes]:
    """RFC 8200 fragmentation: the fragmentable part (its first header `first_next`) split
    after `cut` bytes (a multiple of 8). cut == len(fragmentable) with one piece: an atomic
    fragment."""
    first, unfrag = unfragmentable

    def frag(offset: int, more: bool, piece: bytes) -> bytes:
        fh = struct.pack("!BBHI", first_next, 0, offset | int(more), ident)
        if not unfrag:
            return ipv6(src, dst, FRAGMENT, fh + piece)
        # The last unfragmentable header now points at the Fragment header.
        head = unfrag[:-8] + bytes([FRAGMENT]) + unfrag[-7:]
        return ipv6(src, dst, first, head + fh + piece)

    if cut >= len(fragmentable):
        return [frag(0, False, fragmentable)]
    return [frag(0, True, fragmentable[:cut]), frag(cut, False, fragmentable[cut:])]


def ether(dst_mac: str, src_mac: str, ip_packet: bytes) -> bytes:
    ethertype = 0x86DD if ip_packet[0] >> 4 == 6 else 0x0800
    return (bytes.fromhex(dst_mac.replace(":", "")) + bytes.fromhex(src_mac.replace(":", ""))
            + struct.pack("!H", ethertype) + ip_packet)


# Runs inside the sender's namespace: send the frames, then count the SYN-ACKs per
# destination port for `wait` seconds. argv: ifname; stdin: {"frames": [hex], "wait", "repeat"}.
_SEND_AND_SNIFF = r"""
import json, socket, struct, sys, time
req = json.load(sys.stdin)
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
s.bind((sys.argv[1], 0))
for _ in range(req["repeat"]):
    for f in req["frames"]:
        s.send(bytes.fromhex(f))
s.settimeout(0.05)
deadline, synacks = time.monotonic() + req["wait"], {}
while time.monotonic() < deadline:
    try:
        frame = s.recv(4096)
    except socket.timeout:
        continue
    etype = struct.unpack("!H", frame[12:14])[0]
    if etype == 0x0800 and frame[23] == 6:
        tcp = frame[14 + (frame[14] & 15) * 4:]
    elif etype == 0x86DD and frame[20] == 6:
        tcp = frame[54:]
    else:
        continue
    dport, flags = struct.unpack("!H", tcp[2:4])[0], tcp[13]
    if flags & 0x12 == 0x12:
        synacks[dport] = synacks.get(dport, 0) + 1
print(json.dumps(synacks))
"""

# Runs in the receiver's namespace: count datagrams per payload until `idle` s pass quietly.
# argv: address, port, idle.
TAGGED_UDP_SINK = r"""
import json, socket, sys
s = socket.socket(socket.AF_INET6 if ':' in sys.argv[1] else socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], int(sys.argv[2])))
print('ready', flush=True)
s.settimeout(float(sys.argv[3]))
seen = {}
try:
    while True:
        tag = s.recv(2048).decode(errors='replace')
        seen[tag] = seen.get(tag, 0) + 1
except socket.timeout:
    pass
print(json.dumps(seen), flush=True)
"""


def send_and_sniff(ns: str, ifname: str, frames: list[bytes], wait: float = 0.0,
                   repeat: int = 1) -> dict[int, int]:
    """Send `frames` (`repeat` times) out of ifname in ns; SYN-ACKs seen per port."""
    req = json.dumps({"frames": [f.hex() for f in frames], "wait": wait, "repeat": repeat})
    r = run_in(ns, [sys.executable, "-c", _SEND_AND_SNIFF, ifname], timeout=15, input=req)
    assert r.returncode == 0, f"raw sender in {ns} failed: {r.stderr}"
    return {int(k): v for k, v in json.loads(r.stdout.strip().splitlines()[-1]).items()}
