"""`xdpfw capture` end to end: a bounded flood of crafted UDP frames from a client namespace
to a guarded interface with a drop rule, captured by the daemon and, on the sender's veth,
by tcpdump; the two captures must hold the same packets, byte for byte."""

from __future__ import annotations

import struct
import subprocess
import time

import pytest

from netns_tests import craft
from netns_tests.conftest import XDPFW
from netns_tests.traffic import wait_for
from xdpfw import netns as nsutil
from xdpfw import pcap

FLOOD = 1000
PORT = 9999


def frames(pair, n: int) -> list[bytes]:
    """n UDP frames, each with its number in the payload and a length of its own."""
    dmac = nsutil.link_mac(pair.server, pair.server_if)
    smac = nsutil.link_mac(pair.client, pair.client_if)
    out = []
    for i in range(n):
        payload = struct.pack("!I", i) + bytes((i + k) & 0xFF for k in range(i % 300))
        dgram = craft.udp(pair.client4, pair.server4, 40000 + i % 1000, PORT, payload)
        out.append(craft.ether(dmac, smac, craft.ipv4(pair.client4, pair.server4, craft.UDP,
                                                      dgram, ident=i)))
    return out


def sender_capture(pair, path, count: int) -> subprocess.Popen:
    """tcpdump on the sender's veth, for the frames of the flood only."""
    p = subprocess.Popen(
        ["ip", "netns", "exec", pair.client, "tcpdump", "-i", pair.client_if, "-U", "-s", "0",
         "-c", str(count), "-w", str(path),
         f"udp and src host {pair.client4} and dst port {PORT}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = p.stderr.readline()  # "tcpdump: listening on cli0 ..." once it captures
    assert "listening" in line, f"tcpdump did not start: {line}"
    return p


def capturing(api, n: int) -> bool:
    return api.get("/api/v1/capture/status").json()["running"] == n


@pytest.mark.parametrize("mode", ["native", "generic"])
def test_a_capture_of_a_flood_holds_every_dropped_packet_as_sent(daemon, pair, guarded,
                                                                  tmp_path, mode):
    guarded(mode)
    api = daemon.client()
    r = api.post("/api/v1/rules", json={"prefix": f"{pair.client4}/32", "action": "drop",
                                         "proto": "udp"})
    assert r.status_code == 201, r.text
    ours, theirs = tmp_path / "drops.pcap", tmp_path / "sent.pcap"
    cli = subprocess.Popen([*XDPFW, "capture", "--socket", daemon.socket, "-i", pair.server_if,
                            "--netns", pair.server, "-c", str(FLOOD), "-w", str(ours)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sender = sender_capture(pair, theirs, FLOOD)
    try:
        assert wait_for(lambda: capturing(api, 1), 10), "the capture never started"
        before = api.get("/api/v1/stats").json()["actions"]["rule_drop"]["packets"]
        craft.send_and_sniff(pair.client, pair.client_if, frames(pair, FLOOD))
        _, err = cli.communicate(timeout=30)
        sender.communicate(timeout=10)
    finally:
        for p in (cli, sender):
            p.kill()
    after = api.get("/api/v1/stats").json()["actions"]["rule_drop"]["packets"]
    assert cli.returncode == 0, f"xdpfw capture: rc={cli.returncode} {err}"
    assert after - before >= FLOOD, f"only {after - before} drops counted: {daemon.log()}"
    got = [p.data for p in pcap.read_pcap(ours.read_bytes())]
    sent = [p.data for p in pcap.read_pcap(theirs.read_bytes())]
    assert len(sent) == FLOOD, f"tcpdump on the sender saw {len(sent)} frames"
    assert len(got) == FLOOD, (f"{len(got)} packets captured of {FLOOD} ({err.strip()}); "
                               f"status {api.get('/api/v1/capture/status').json()}")
    differ = [i for i, (a, b) in enumerate(zip(got, sent, strict=True)) if a != b]
    assert not differ, f"{len(differ)} packets differ from what was sent, first #{differ[0]}"
    assert f"{FLOOD} packets captured" in err, err
    read = subprocess.run(["tcpdump", "-nn", "-r", str(ours)], capture_output=True, text=True)
    assert read.returncode == 0, read.stderr
    assert len(read.stdout.splitlines()) == FLOOD, read.stdout[-500:]
    assert wait_for(lambda: capturing(api, 0), 5), "the capture did not end with the client"


def test_the_api_streams_pcapng_with_reasons_and_filters(daemon, pair, guarded):
    guarded("generic", policy="drop")
    api = daemon.client()
    r = api.post("/api/v1/rules", json={"prefix": f"{pair.client4}/32", "action": "drop",
                                         "proto": "udp"})
    assert r.status_code == 201, r.text
    rule = r.json()["id"]
    params = {"interface": pair.server_if, "netns": pair.server, "rule": rule, "count": 5,
              "format": "pcapng", "snaplen": 64}
    with api.stream("GET", "/api/v1/capture", params=params) as stream:
        assert stream.status_code == 200
        assert stream.headers["content-type"] == pcap.PCAPNG_MEDIA_TYPE
        assert wait_for(lambda: capturing(api, 1), 10)
        craft.send_and_sniff(pair.client, pair.client_if, frames(pair, 5))
        body = b"".join(stream.iter_raw())
    assert body[:4] == b"\x0a\x0d\x0d\x0a", "not a pcapng section"
    assert f"drop: rule_drop, rule {rule}".encode() in body, "the reason is not in a comment"
    assert f"{pair.server_if}@{pair.server}".encode() in body, "the interface is not named"
    out = subprocess.run(["tcpdump", "-nn", "-r", "-"], input=body, capture_output=True)
    assert out.returncode == 0, out.stderr
    assert len(out.stdout.splitlines()) == 5, out.stdout
    # Unknown names are refused before anything streams.
    assert api.get("/api/v1/capture", params={"rule": 999999}).status_code == 404
    assert api.get("/api/v1/capture", params={"reason": "nope"}).status_code == 422
    time.sleep(0.2)
    assert capturing(api, 0), "a refused capture left the kernel capturing"


def test_capture_to_stdout_pipes_into_tcpdump(daemon, pair, guarded):
    guarded("native")
    api = daemon.client()
    r = api.post("/api/v1/rules", json={"prefix": f"{pair.client4}/32", "action": "drop",
                                         "proto": "udp"})
    assert r.status_code == 201, r.text
    cli = subprocess.Popen([*XDPFW, "capture", "--socket", daemon.socket, "-c", "5", "-w", "-"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    dump = subprocess.Popen(["tcpdump", "-nn", "-r", "-"], stdin=cli.stdout,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    cli.stdout.close()  # tcpdump holds the pipe now
    try:
        assert wait_for(lambda: capturing(api, 1), 10), "the capture never started"
        craft.send_and_sniff(pair.client, pair.client_if, frames(pair, 5))
        out, err = dump.communicate(timeout=30)
        cli.wait(timeout=10)
    finally:
        for p in (cli, dump):
            p.kill()
    assert dump.returncode == 0, err
    lines = out.splitlines()
    assert len(lines) == 5 and all(f"{pair.client4}." in line for line in lines), out
    assert b"5 packets captured to stdout" in cli.stderr.read()
