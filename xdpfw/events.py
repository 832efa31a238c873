"""Sampled drop events: read from the program's ring buffer, fanned out to subscribers.

The XDP program pushes 1 drop in `sample_rate` (pinned map fw_config; 0: none), so a flood
costs the reader at most rate-limited work. The Dataplane reads the ring buffer of the build
that runs, across upgrades, on a thread of its own (Dataplane.read_events). Each subscriber
(an SSE client) has a bounded queue: when it lags, its oldest events are dropped and counted,
and the reader never blocks on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from xdpfw.dataplane import abi
from xdpfw.dataplane.dataplane import Dataplane
from xdpfw.dataplane.ringbuf import RingReader
from xdpfw.service import Firewall

log = logging.getLogger(__name__)

L4_NAMES = {1: "icmp", 6: "tcp", 17: "udp", 58: "icmpv6"}
ETH_P_IP, ETH_P_IPV6, ETH_P_ARP = 0x0800, 0x86DD, 0x0806


def decode(raw: abi.DropEvent) -> dict:
    """The kernel's struct drop_event as JSON-ready fields (byte order converted here)."""
    eth = socket.ntohs(raw.eth_proto)
    if eth == ETH_P_IP:
        family, saddr, daddr = 4, bytes(raw.saddr[:4]), bytes(raw.daddr[:4])
        af = socket.AF_INET
    elif eth == ETH_P_IPV6:
        family, saddr, daddr = 6, bytes(raw.saddr), bytes(raw.daddr)
        af = socket.AF_INET6
    else:
        family = None
    out = {
        "type": "drop",
        "action": "drop",
        "reason": abi.REASON_NAMES.get(raw.reason, str(raw.reason)),
        "rule_slot": None if raw.rule_slot == abi.NO_RULE else raw.rule_slot,
        "iface_slot": raw.iface,
        "len": raw.pkt_len,
        "family": family,
        "ethertype": f"0x{eth:04x}",
        "proto": L4_NAMES.get(raw.l4_proto, str(raw.l4_proto)) if family else
        ("arp" if eth == ETH_P_ARP else "other"),
        "saddr": socket.inet_ntop(af, saddr) if family else None,
        "daddr": socket.inet_ntop(af, daddr) if family else None,
        "sport": socket.ntohs(raw.sport),
        "dport": socket.ntohs(raw.dport),
    }
    return out


@dataclass(eq=False)
class Subscriber:
    loop: asyncio.AbstractEventLoop
    queue: deque
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    missed: int = 0  # events dropped because this subscriber lagged, not yet reported


class EventHub:
    def __init__(self, dataplane: Dataplane, firewall: Firewall,
                 queue_size: int = 1024) -> None:
        """firewall: names the rule and the interface of an event's slots."""
        self.dp = dataplane
        self.fw = firewall
        self.queue_size = queue_size
        self.lock = threading.Lock()
        self.subscribers: set[Subscriber] = set()
        self.read = 0
        self.dropped_slow_client = 0
        self.sample_rate = 0
        self._reader: RingReader | None = None
        self.ended = False  # the daemon is stopping: event streams end

    # -- lifecycle --------------------------------------------------------------------------

    def start(self, sample_rate: int) -> None:
        self.set_sample_rate(sample_rate)
        self._reader = self.dp.read_events(self._on_record)

    def stop(self) -> None:
        if self._reader is not None:
            self.dp.stop_events(self._reader)
            self._reader = None

    # -- sampling ---------------------------------------------------------------------------

    def set_sample_rate(self, rate: int) -> None:
        if rate < 0:
            raise ValueError("sample_rate must be 0 (off) or more")
        self.dp.set_sample_rate(rate)
        self.sample_rate = rate

    # -- fan-out ----------------------------------------------------------------------------

    def _on_record(self, record: bytes) -> None:
        try:
            raw = abi.DropEvent.from_buffer_copy(record)
            event = decode(raw)
        except Exception as e:  # a bad record must not stop the reader
            log.warning("undecodable drop event (%d bytes): %s", len(record), e)
            return
        event["time"] = time.time()
        slot = event["rule_slot"]
        event["rule_id"] = self.fw.rule_id_of_slot(slot) if slot is not None else None
        att = self.fw.interface_at(raw.iface)
        if att is not None:
            event["interface"], event["netns"] = att.record.name, att.record.netns
        with self.lock:
            self.read += 1
            subs = list(self.subscribers)
        for sub in subs:
            if len(sub.queue) == sub.queue.maxlen:  # deque drops the oldest on append
                sub.missed += 1
                with self.lock:
                    self.dropped_slow_client += 1
            sub.queue.append(event)
            sub.loop.call_soon_threadsafe(sub.wake.set)

    def end_streams(self) -> None:
        """Wake every subscriber for the last time: an open stream would otherwise hold the
        server's shutdown until its grace period runs out."""
        self.ended = True
        with self.lock:
            subs = list(self.subscribers)
        for sub in subs:
            with contextlib.suppress(RuntimeError):  # its loop is closed already
                sub.loop.call_soon_threadsafe(sub.wake.set)

    def subscribe(self, loop: asyncio.AbstractEventLoop) -> Subscriber:
        sub = Subscriber(loop, deque(maxlen=self.queue_size))
        with self.lock:
            self.subscribers.add(sub)
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        with self.lock:
            self.subscribers.discard(sub)

    def metrics(self) -> dict[str, int]:
        with self.lock:
            return {
                "sample_rate": self.sample_rate,
                "read": self.read,
                "dropped_slow_client": self.dropped_slow_client,
                "subscribers": len(self.subscribers),
            }
