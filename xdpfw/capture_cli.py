"""`xdpfw capture`: the packets the firewall gives a verdict, into a pcap file or a pipe.

    xdpfw capture -i eth1 --reason rule_drop -c 1000 -w drops.pcap
    xdpfw capture --rule 12 -w - | tcpdump -nr -

The daemon streams GET /api/v1/capture; this writes the bytes as they come and flushes
each chunk, so `tcpdump -r -` (or Wireshark) shows packets live.
"""

from __future__ import annotations

import argparse
import struct
import sys

from xdpfw.client import Client


class PacketCounter:
    """Counts the packets of a pcap or pcapng stream as its bytes go by."""

    def __init__(self, pcapng: bool) -> None:
        self.pcapng = pcapng
        self.packets = 0
        self._skip = 0 if pcapng else 24  # bytes to pass before the next header
        self._tail = b""

    def feed(self, chunk: bytes) -> None:
        data = self._tail + chunk
        pos = 0
        head = 8 if self.pcapng else 16
        while True:
            pos += self._skip
            self._skip = 0
            if pos + head > len(data):
                if pos > len(data):  # still inside a record's bytes
                    self._skip, pos = pos - len(data), len(data)
                break
            if self.pcapng:
                kind, length = struct.unpack_from("<II", data, pos)
                self.packets += kind == 6
                self._skip = length
            else:
                self.packets += 1
                self._skip = head + struct.unpack_from("<I", data, pos + 8)[0]
        self._tail = data[pos:]


def capture(args: argparse.Namespace) -> int:
    pcapng = args.pcapng or args.write.endswith(".pcapng")
    params: dict = {"snaplen": args.snaplen, "format": "pcapng" if pcapng else "pcap"}
    for key, value in (("interface", args.interface), ("netns", args.netns),
                       ("rule", args.rule), ("count", args.count), ("seconds", args.seconds)):
        if value is not None:
            params[key] = value
    if args.reason:
        params["reason"] = args.reason
    if args.pass_:
        params["verdict"] = "pass"
    counter = PacketCounter(pcapng)
    out = sys.stdout.buffer if args.write == "-" else open(args.write, "wb")  # noqa: SIM115
    try:
        with Client(args.socket) as c:
            before = c.get("/api/v1/capture/status")["kernel"]
            try:
                for chunk in c.stream("/api/v1/capture", params):
                    out.write(chunk)
                    out.flush()
                    counter.feed(chunk)
            except KeyboardInterrupt:
                pass
            after = c.get("/api/v1/capture/status")["kernel"]
    except BrokenPipeError:  # the reader of `-w -` went away
        return 0
    finally:
        if out is not sys.stdout.buffer:
            out.close()
    where = "stdout" if args.write == "-" else args.write
    limited = after["rate_limited"]["packets"] - before["rate_limited"]["packets"]
    lost = after["ring_full"]["packets"] - before["ring_full"]["packets"]
    note = (f"; meanwhile the kernel refused {limited} (rate limit) and lost {lost} (ring "
            "full) packets of the captures running") if limited or lost else ""
    print(f"{counter.packets} packets captured to {where}{note}", file=sys.stderr)
    return 0


def add_capture_command(sub: argparse._SubParsersAction, api: argparse.ArgumentParser) -> None:
    p = sub.add_parser("capture", parents=[api],
                       help="write the packets the firewall drops (or passes) to a pcap file")
    p.add_argument("-i", "--interface", help="a guarded interface (default: all)")
    p.add_argument("--netns", help="the interface's network namespace")
    p.add_argument("--rule", type=int, help="only packets this rule (id) decided")
    p.add_argument("--reason", action="append",
                   help="only this reason (rule_drop, policy_drop, ...; repeat for more)")
    p.add_argument("--pass", dest="pass_", action="store_true",
                   help="packets let through (to the stack or forwarded) instead of drops")
    p.add_argument("-c", "--count", type=int, help="stop after this many packets")
    p.add_argument("--seconds", type=float, help="stop after this long")
    p.add_argument("-s", "--snaplen", type=int, default=2048,
                   help="bytes kept of each packet (at most 2048)")
    p.add_argument("--pcapng", action="store_true",
                   help="pcapng (interfaces named, each packet's reason as a comment); also "
                        "when FILE ends in .pcapng")
    p.add_argument("-w", "--write", required=True, metavar="FILE",
                   help="where to write, - for stdout")
    p.set_defaults(func=capture)
