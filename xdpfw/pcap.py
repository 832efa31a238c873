"""pcap and pcapng, written as a capture streams (and pcap read back, for tests and tools).

pcap (tcpdump's format): a 24-byte file header, then a 16-byte header per packet. Times are
in nanoseconds (magic 0xa1b23c4d), which tcpdump and Wireshark read.

pcapng (Wireshark's): a section header, an interface description per interface as it first
appears (named "eth1" or "eth1@netns"), then one enhanced packet block per packet, whose
comment says why xdpfw gave it its verdict ("rule_drop, rule 12"). Blocks are written in
the host's byte order, as the format allows (the section header's magic says which).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass

LINKTYPE_ETHERNET = 1
PCAP_MAGIC_NS = 0xA1B23C4D
PCAP_MAGIC_US = 0xA1B2C3D4
_FILE = struct.Struct("<IHHiIII")
_RECORD = struct.Struct("<IIII")

PCAP_MEDIA_TYPE = "application/vnd.tcpdump.pcap"
PCAPNG_MEDIA_TYPE = "application/x-pcapng"


@dataclass(frozen=True)
class Packet:
    ts_ns: int  # wall clock, nanoseconds since the epoch
    data: bytes  # the bytes captured (at most snaplen)
    orig_len: int  # the frame's length on the wire
    iface: str = ""  # pcapng: the interface's name
    comment: str = ""  # pcapng: why it got its verdict


class PcapWriter:
    """pcap: header() once, then packet() per packet; each returns the bytes to write."""

    media_type = PCAP_MEDIA_TYPE

    def __init__(self, snaplen: int) -> None:
        self.snaplen = snaplen

    def header(self) -> bytes:
        return _FILE.pack(PCAP_MAGIC_NS, 2, 4, 0, 0, self.snaplen, LINKTYPE_ETHERNET)

    def packet(self, p: Packet) -> bytes:
        sec, nsec = divmod(p.ts_ns, 1_000_000_000)
        return _RECORD.pack(sec, nsec, len(p.data), p.orig_len) + p.data


def _pad4(b: bytes) -> bytes:
    return b + b"\0" * (-len(b) % 4)


def _option(code: int, value: bytes) -> bytes:
    return struct.pack("<HH", code, len(value)) + _pad4(value)


def _block(kind: int, body: bytes) -> bytes:
    total = 12 + len(body)
    return struct.pack("<II", kind, total) + body + struct.pack("<I", total)


class PcapngWriter:
    """pcapng: header() once, then packet() per packet (an interface block goes out before
    the first packet of each interface)."""

    media_type = PCAPNG_MEDIA_TYPE
    SHB, IDB, EPB = 0x0A0D0D0A, 0x00000001, 0x00000006
    OPT_END, OPT_COMMENT, IF_NAME, IF_TSRESOL = 0, 1, 2, 9

    def __init__(self, snaplen: int) -> None:
        self.snaplen = snaplen
        self._ifaces: dict[str, int] = {}

    def header(self) -> bytes:
        opts = _option(2, b"xdpfw") + _option(self.OPT_END, b"")  # shb_hardware
        # byte-order magic, version 1.0, section length unknown (-1)
        return _block(self.SHB, struct.pack("<IHHq", 0x1A2B3C4D, 1, 0, -1) + opts)

    def _interface(self, name: str) -> tuple[int, bytes]:
        if name in self._ifaces:
            return self._ifaces[name], b""
        self._ifaces[name] = len(self._ifaces)
        opts = (_option(self.IF_NAME, name.encode()) + _option(self.IF_TSRESOL, b"\x09")
                + _option(self.OPT_END, b""))  # timestamps in 10^-9 s
        return self._ifaces[name], _block(
            self.IDB, struct.pack("<HHI", LINKTYPE_ETHERNET, 0, self.snaplen) + opts)

    def packet(self, p: Packet) -> bytes:
        idx, idb = self._interface(p.iface or "xdpfw")
        opts = (_option(self.OPT_COMMENT, p.comment.encode()) + _option(self.OPT_END, b"")
                if p.comment else b"")
        body = struct.pack("<IIIII", idx, p.ts_ns >> 32, p.ts_ns & 0xFFFFFFFF, len(p.data),
                           p.orig_len) + _pad4(p.data) + opts
        return idb + _block(self.EPB, body)


def writer(fmt: str, snaplen: int) -> PcapWriter | PcapngWriter:
    if fmt == "pcapng":
        return PcapngWriter(snaplen)
    if fmt == "pcap":
        return PcapWriter(snaplen)
    raise ValueError(f"unknown capture format {fmt!r}: pcap or pcapng")


def read_pcap(data: bytes) -> Iterator[Packet]:
    """The packets of a pcap file (either byte order, micro- or nanosecond times)."""
    if len(data) < 24:
        raise ValueError(f"not a pcap file: {len(data)} bytes")
    for order in "<>":
        magic = struct.unpack(f"{order}I", data[:4])[0]
        if magic in (PCAP_MAGIC_NS, PCAP_MAGIC_US):
            break
    else:
        raise ValueError(f"not a pcap file: magic {data[:4].hex()}")
    scale = 1 if magic == PCAP_MAGIC_NS else 1000
    rec = struct.Struct(f"{order}IIII")
    pos = 24
    while pos + 16 <= len(data):
        sec, frac, caplen, orig = rec.unpack_from(data, pos)
        pos += 16
        yield Packet(sec * 1_000_000_000 + frac * scale, data[pos:pos + caplen], orig)
        pos += caplen
