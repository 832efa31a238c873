"""Issue 9 end to end: header tricks do not get a blocked source past `xdpfw serve`.

Crafted frames (valid checksums, shapes the Linux stack accepts) go raw from the client
namespace to the guarded server end, in native and generic mode. From the blocked source no
datagram reaches the server's socket and no SYN draws a SYN-ACK; the same shapes from an
unblocked address of the same client do get through, which shows that the kernel accepts
them and that the test would see a bypass. The exceptions are shapes the firewall drops from
everyone on purpose (RFC 1858 tiny/overlapping IPv4 fragments, RFC 7112 IPv6 first fragments
without their header chain): those are checked to be dropped from both.

Every shape of a test goes out in one batch with its own source port (and IP id, so that a
fragment one shape leaves in a reassembly queue cannot complete another), and the replies
are told apart by port. On the previous parser this module failed with the bypasses of the
issue (UDP behind 6-20 extension headers, SYN-ACKs to tiny fragments and to 12/17 headers).
"""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from netns_tests import craft
from netns_tests.traffic import TCP_SERVER, _start
from xdpfw import netns as nsutil

MODES = ["native", "generic"]
BLOCKED4, OPEN4 = "10.201.0.1", "10.201.0.3"
BLOCKED6, OPEN6 = "fd20::1", "fd20::3"
CHAINS = [0, 1, 5, 6, 7, 8, 12, 17, 20]  # 17 and 20: past the 16-header walk (incomplete)
ANYONE = "dropped from anyone"  # a shape dropped whatever the source (RFC 1858 / 7112)

Shapes = dict[str, tuple[Callable[[str, int], list[bytes]], str]]  # name -> (make, kind)


@pytest.fixture
def lab(daemon, pair, guarded):
    """The pair with a second, unblocked address on the client; `setup(mode, *rules)`."""
    with nsutil.rtnl(pair.client) as ip:
        idx = ip.link_lookup(ifname=pair.client_if)[0]
        ip.addr("add", index=idx, address=OPEN4, prefixlen=24)
        ip.addr("add", index=idx, address=OPEN6, prefixlen=64, flags=0x02)  # nodad
    macs = (nsutil.link_mac(pair.server, pair.server_if),
            nsutil.link_mac(pair.client, pair.client_if))

    def setup(mode: str, *rules: dict) -> None:
        guarded(mode)
        api = daemon.client()
        for rule in rules:
            r = api.post("/api/v1/rules", json=rule)
            assert r.status_code == 201, r.text

    return pair, setup, macs


def send(pair, macs, packets: list[bytes], wait: float, repeat: int = 1) -> dict[int, int]:
    frames = [craft.ether(macs[0], macs[1], p) for p in packets]
    return craft.send_and_sniff(pair.client, pair.client_if, frames, wait, repeat)


def check_syns(pair, macs, dst: str, shapes: Shapes, blocked: str, unblocked: str) -> None:
    """Send every shape from both sources at once; the blocked one must draw no SYN-ACK,
    the unblocked one must draw one unless the shape is dropped from anyone."""
    plan, packets = [], []
    for base, src in ((41000, blocked), (42000, unblocked)):
        for i, (name, (make, kind)) in enumerate(shapes.items()):
            plan.append((src, name, kind, base + i))
            packets += make(src, base + i)
    server = _start(pair.server, TCP_SERVER, dst, "22", "4")
    try:
        replies = send(pair, macs, packets, wait=1.0)
    finally:
        server.kill()
        server.wait()
    leaked = [f"{name} from {src}" for src, name, kind, port in plan
              if replies.get(port) and (src == blocked or kind == ANYONE)]
    missing = [name for src, name, kind, port in plan
               if src == unblocked and kind != ANYONE and not replies.get(port)]
    assert not leaked, f"SYN-ACKs for: {leaked}"
    assert not missing, f"no SYN-ACK for the unblocked controls: {missing} (replies {replies})"


@pytest.mark.parametrize("mode", MODES)
def test_ipv6_extension_header_chains(lab, mode):
    pair, setup, macs = lab
    setup(mode, {"prefix": f"{BLOCKED6}/128", "action": "drop"})
    dst, port = pair.server6, 7000
    packets = []
    for n in CHAINS:
        for src in (BLOCKED6, OPEN6):
            dgram = craft.udp(src, dst, 40000 + n, port, f"{src} {n}".encode())
            packets.append(craft.ipv6_behind(src, dst, n, craft.UDP, dgram))
    sink = _start(pair.server, craft.TAGGED_UDP_SINK, dst, str(port), "0.7")
    try:
        send(pair, macs, packets, wait=0, repeat=3)
        out, _ = sink.communicate(timeout=15)
    finally:
        sink.kill()
    seen = json.loads(out.strip().splitlines()[-1])
    leaked = {tag: k for tag, k in seen.items() if tag.startswith(BLOCKED6 + " ")}
    missing = [n for n in CHAINS if not seen.get(f"{OPEN6} {n}")]
    assert not leaked, f"UDP from the blocked source reached the socket: {leaked}"
    assert not missing, f"controls from an unblocked source never arrived: {missing} headers"


@pytest.mark.parametrize("mode", MODES)
def test_ipv6_fragments_and_incomplete_chains_with_a_port_rule(lab, mode):
    pair, setup, macs = lab
    setup(mode, {"prefix": f"{BLOCKED6}/128", "action": "drop", "proto": "tcp", "dport": 22})
    dst = pair.server6

    def syn(src: str, p: int, data: bytes = b"") -> bytes:
        return craft.tcp_syn(src, dst, p, 22, data=data)

    def frag(src: str, p: int, first: int, part: bytes, cut: int) -> list[bytes]:
        return craft.ipv6_fragments(src, dst, (0, b""), first, part, cut, ident=p)

    opts = craft.dstopts(craft.TCP)
    shapes: Shapes = {
        "plain": (lambda s, p: [craft.ipv6(s, dst, craft.TCP, syn(s, p))], ""),
        "12 dstopts": (lambda s, p: [craft.ipv6_behind(s, dst, 12, craft.TCP, syn(s, p))], ""),
        "17 dstopts (incomplete)":
            (lambda s, p: [craft.ipv6_behind(s, dst, 17, craft.TCP, syn(s, p))], ""),
        "atomic fragment": (lambda s, p: frag(s, p, craft.TCP, syn(s, p), 1 << 16), ""),
        "split, whole chain first":
            (lambda s, p: frag(s, p, 60, opts + syn(s, p, b"\0" * 24), 32), ""),
        "split, TCP in the 2nd fragment (RFC 7112)":
            (lambda s, p: frag(s, p, 60, opts + syn(s, p), 8), ANYONE),
        "split after 8 bytes of TCP (RFC 7112)":
            (lambda s, p: frag(s, p, craft.TCP, syn(s, p), 8), ANYONE),
    }
    check_syns(pair, macs, dst, shapes, BLOCKED6, OPEN6)


@pytest.mark.parametrize("mode", MODES)
def test_ipv4_tiny_fragments_and_options_with_a_port_rule(lab, mode):
    pair, setup, macs = lab
    setup(mode, {"prefix": f"{BLOCKED4}/32", "action": "drop", "proto": "tcp", "dport": 22})
    dst = pair.server4
    nops = b"\x01\x01\x01\x00"  # three NOPs and an end of options

    def syn(src: str, p: int) -> bytes:
        return craft.tcp_syn(src, dst, p, 22)

    def long_syn(src: str, p: int) -> bytes:  # a 40-byte TCP header and 8 bytes of data
        return craft.tcp_syn(src, dst, p, 22, options=b"\x01" * 20, data=b"x" * 8)

    def split(src: str, p: int, seg: bytes, cut: int) -> list[bytes]:
        return craft.ipv4_fragments(src, dst, craft.TCP, seg, cut, ident=p)

    shapes: Shapes = {
        "plain": (lambda s, p: [craft.ipv4(s, dst, craft.TCP, syn(s, p), p)], ""),
        "IPv4 options":
            (lambda s, p: [craft.ipv4(s, dst, craft.TCP, syn(s, p), p, options=nops * 2)], ""),
        "split, whole TCP header first": (lambda s, p: split(s, p, long_syn(s, p), 40), ""),
        "8 bytes of TCP first (RFC 1858)": (lambda s, p: split(s, p, syn(s, p), 8), ANYONE),
        "16 bytes of TCP first (RFC 1858)": (lambda s, p: split(s, p, syn(s, p), 16), ANYONE),
        "8 bytes, second fragment first (RFC 1858)":
            (lambda s, p: split(s, p, syn(s, p), 8)[::-1], ANYONE),
        "16 bytes, second fragment first (RFC 1858)":
            (lambda s, p: split(s, p, syn(s, p), 16)[::-1], ANYONE),
    }
    check_syns(pair, macs, dst, shapes, BLOCKED4, OPEN4)
