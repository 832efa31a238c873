"""Packet capture against the real program (BPF_PROG_TEST_RUN): what the kernel copies, what
its filters keep out, the rate limit, and that nothing is copied while no capture runs."""

from __future__ import annotations

import asyncio
import time

import pytest

from tests import packets as P
from tests.test_program import add
from xdpfw import pcap
from xdpfw.capture import VERDICTS, CaptureFilter, CaptureHub, RateLimit, kernel_filter
from xdpfw.dataplane import abi

pytestmark = pytest.mark.bpf

BLOCKED = "198.51.100.7"


@pytest.fixture
def hub(fw):
    h = CaptureHub(fw.dp, RateLimit(rate=1_000_000, burst=1_000_000))
    yield h
    h.stop()


@pytest.fixture
def loop():
    lp = asyncio.new_event_loop()
    yield lp
    lp.close()


def drain(session, want: int, timeout: float = 5.0) -> list:
    """The session's records once `want` have come (or what came by the timeout)."""
    deadline = time.monotonic() + timeout
    while len(session.queue) < want and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.1)  # anything beyond `want` would have come by now
    return list(session.queue)


def kernel(hub) -> dict[str, int]:
    return {k: v["packets"] for k, v in hub.status()["kernel"].items()}


def test_a_capture_takes_the_dropped_frames_whole(fw, run, hub, loop):
    rule = add(fw, f"{BLOCKED}/32", "drop")
    frames = [P.eth(P.ETH_IP, P.ipv4(BLOCKED, "10.0.0.1", P.UDP, P.l4(P.UDP, 1000 + i)
                                     + bytes(range(i * 7 % 256)) ))
              for i in range(20)]
    session = hub.open(CaptureFilter(), loop)
    assert fw.maps.fw_config._value.capture == 1, "the per-packet flag is not set"
    for f in frames:
        assert run(f).verdict == "XDP_DROP"
    assert run(P.eth(P.ETH_IP, P.ipv4("10.9.9.9", "10.0.0.1", P.UDP, P.l4(P.UDP, 9)))
               ).verdict == "XDP_PASS"
    got = drain(session, len(frames))
    assert [r.data for r in got] == frames, "captured bytes differ from the frames run"
    assert all(r.orig_len == len(f) for r, f in zip(got, frames, strict=True))
    assert {(r.reason, r.verdict, r.rule_slot) for r in got} == {
        (abi.REASON_RULE_DROP, 1, rule.slot)}, "reason, verdict or rule slot differ"
    assert abs(got[0].ts_ns - time.time_ns()) < 30e9, "timestamps are not wall-clock time"


def test_filters_are_applied_in_the_kernel(fw, run, hub, loop):
    add(fw, f"{BLOCKED}/32", "drop")
    other = add(fw, "203.0.113.0/24", "drop")
    before = kernel(hub)
    session = hub.open(CaptureFilter(rule_slot=other.slot, snaplen=20), loop)
    cfg = kernel_filter([session.filter], hub.limit)
    assert cfg.rule_slot == other.slot and cfg.snaplen == 20
    run(P.udp4(BLOCKED, 53))  # another rule's drop: not copied
    run(P.udp4("10.1.1.1", 53))  # a pass: not copied
    frame = P.udp4("203.0.113.9", 53)
    run(frame)
    got = drain(session, 1)
    assert [r.data for r in got] == [frame[:20]], "snaplen or the rule filter not applied"
    assert got[0].orig_len == len(frame)
    after = kernel(hub)
    assert after["captured"] - before["captured"] == 1, (before, after)


def test_pass_verdicts_and_reasons(fw, run, hub, loop):
    session = hub.open(CaptureFilter(verdicts=VERDICTS["pass"],
                                     reasons=frozenset({abi.REASON_POLICY_PASS})), loop)
    frame = P.udp4("10.1.1.1", 53)
    run(frame)
    got = drain(session, 1)
    assert [(r.data, r.reason, r.verdict) for r in got] == [(frame, abi.REASON_POLICY_PASS, 2)]


def test_the_rate_limit_bounds_what_a_flood_copies(fw, run, hub, loop):
    add(fw, f"{BLOCKED}/32", "drop")
    hub.limit = RateLimit(rate=1, burst=5)  # 5 back to back, then one a second
    before = kernel(hub)
    session = hub.open(CaptureFilter(), loop)
    assert run(P.udp4(BLOCKED, 53), repeat=1000).verdict == "XDP_DROP"
    got = drain(session, 5, timeout=2)
    after = kernel(hub)
    assert len(got) == 5, f"{len(got)} copied in a 1000-packet burst, burst is 5"
    assert after["captured"] - before["captured"] == 5
    assert after["rate_limited"] - before["rate_limited"] == 995
    # The next capture, with a looser limit, does not wait out this one's debt.
    hub.close(session)
    hub.limit = RateLimit(rate=1_000_000, burst=1_000)
    session = hub.open(CaptureFilter(), loop)
    run(P.udp4(BLOCKED, 53))
    assert len(drain(session, 1, timeout=2)) == 1, "a looser limit inherited the old debt"


def test_nothing_is_copied_while_no_capture_runs(fw, run, hub, loop):
    add(fw, f"{BLOCKED}/32", "drop")
    session = hub.open(CaptureFilter(), loop)
    hub.close(session)
    assert fw.maps.fw_config._value.capture == 0, "the flag stays set after the last capture"
    before = kernel(hub)
    run(P.udp4(BLOCKED, 53), repeat=100)
    assert kernel(hub) == before, "the program looked at the capture filter with none running"


def test_pcap_and_pcapng_round_trip():
    frames = [b"\x01" * 60, b"\x02" * 61]
    w = pcap.PcapWriter(2048)
    data = w.header() + b"".join(w.packet(pcap.Packet(1_700_000_000_123_456_789 + i, f,
                                                      len(f) + 4)) for i, f in enumerate(frames))
    back = list(pcap.read_pcap(data))
    assert [p.data for p in back] == frames
    assert [p.orig_len for p in back] == [64, 65]
    assert back[0].ts_ns == 1_700_000_000_123_456_789
    ng = pcap.PcapngWriter(2048)
    blob = ng.header() + ng.packet(pcap.Packet(1, frames[0], 60, "eth1", "drop: rule_drop"))
    assert len(blob) % 4 == 0 and blob[:4] == b"\x0a\x0d\x0d\x0a"


def test_closing_the_last_capture_while_packets_come_does_not_hang(fw, run, hub, loop):
    """The reader's thread is joined when the last capture closes: it must never wait for
    the lock the closing thread holds (it once did, and both hung)."""
    import threading

    add(fw, f"{BLOCKED}/32", "drop")
    session = hub.open(CaptureFilter(), loop)
    flood = threading.Thread(target=run, args=(P.udp4(BLOCKED, 53),), kwargs={"repeat": 300_000})
    flood.start()
    deadline = time.monotonic() + 5
    while not session.queue and time.monotonic() < deadline:
        time.sleep(0.001)
    assert session.queue, "nothing captured"
    closer = threading.Thread(target=hub.close, args=(session,), daemon=True)
    closer.start()
    closer.join(10)
    flood.join(30)
    assert not closer.is_alive(), "closing the last capture hung"
    assert fw.maps.fw_config._value.capture == 0
