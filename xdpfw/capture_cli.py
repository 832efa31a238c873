"""`xdpfw capture`: the packets the firewall gives a verdict, into a pcap file or a pipe.

    xdpfw capture -i eth1 --reason rule_drop -c 1000 -w drops.pcap
    xdpfw capture --rule 12 -w - | tcpdump -nr -

The daemon streams GET /api/v1/capture; this writes the bytes as they come and flushes
each chunk, so `tcpdump -r -` (or Wireshark) shows packets live.
"""

from __future__ import annotations

import struct
import sys

import click

from xdpfw.cli_options import socket_option
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


@click.command()
@click.option("-i", "--interface", help="a guarded interface (default: all)")
@click.option("--netns", help="the interface's network namespace")
@click.option("--rule", type=int, help="only packets this rule (id) decided")
@click.option("--reason", multiple=True,
              help="only this reason (rule_drop, policy_drop, ...; repeat for more)")
@click.option("--pass", "pass_", is_flag=True,
              help="packets let through (to the stack or forwarded) instead of drops")
@click.option("-c", "--count", type=int, help="stop after this many packets")
@click.option("--seconds", type=float, help="stop after this long")
@click.option("-s", "--snaplen", type=int, default=2048, show_default=True,
              help="bytes kept of each packet (at most 2048)")
@click.option("--pcapng", is_flag=True,
              help="pcapng (interfaces named, each packet's reason as a comment); also when "
                   "FILE ends in .pcapng")
@click.option("-w", "--write", required=True, metavar="FILE", help="where to write, - for stdout")
@socket_option
def capture(interface, netns, rule, reason, pass_, count, seconds, snaplen, pcapng, write,
            socket) -> int:
    """Write the packets the firewall drops (or passes) to a pcap file."""
    pcapng = pcapng or write.endswith(".pcapng")
    params: dict = {"snaplen": snaplen, "format": "pcapng" if pcapng else "pcap"}
    for key, value in (("interface", interface), ("netns", netns), ("rule", rule),
                       ("count", count), ("seconds", seconds)):
        if value is not None:
            params[key] = value
    if reason:
        params["reason"] = list(reason)
    if pass_:
        params["verdict"] = "pass"
    counter = PacketCounter(pcapng)
    out = sys.stdout.buffer if write == "-" else open(write, "wb")  # noqa: SIM115
    try:
        with Client(socket) as c:
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
    where = "stdout" if write == "-" else write
    limited = after["rate_limited"]["packets"] - before["rate_limited"]["packets"]
    lost = after["ring_full"]["packets"] - before["ring_full"]["packets"]
    note = (f"; meanwhile the kernel refused {limited} (rate limit) and lost {lost} (ring "
            "full) packets of the captures running") if limited or lost else ""
    print(f"{counter.packets} packets captured to {where}{note}", file=sys.stderr)
    return 0
