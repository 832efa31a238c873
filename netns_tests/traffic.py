"""Bounded traffic between test namespaces: ping, UDP datagrams, TCP connects.

Every run is bounded in count and time, and goes only to addresses of namespaces the test
created. Results carry the commands' output so that a failure message shows what happened.
"""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass

from xdpfw.netns import run_in
from xdpfw.proxy.loader import VERDICT_RECOUNT

PY = sys.executable

# Sends paced datagrams (from each SOURCE address in turn, else from any) until SIGTERM or its
# bounds, then prints how many it sent. argv: DST PORT PPS MAX_PACKETS MAX_SECONDS [SOURCE...]
PACED_FLOOD = """
import signal, socket, sys, time
dst, port, pps, cap = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
max_s = float(sys.argv[5])
socks = []
for src in sys.argv[6:] or [None]:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    if src is not None:
        s.bind((src, 0))
    socks.append(s)
stop = False
def halt(*_):
    global stop; stop = True
signal.signal(signal.SIGTERM, halt)
print('ready', flush=True)
burst, sent, start = max(pps // 100, 1), 0, time.monotonic()
while not stop and sent < cap and time.monotonic() - start < max_s:
    for _ in range(burst):
        socks[sent % len(socks)].sendto(b'f' * 32, (dst, port)); sent += 1
    time.sleep(max(0.0, start + sent / pps - time.monotonic()))
print(sent, flush=True)
"""

UDP_SINK = """
import socket, sys, time
s = socket.socket(socket.AF_INET6 if ':' in sys.argv[1] else socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], int(sys.argv[2])))
print('ready', flush=True)
s.settimeout(float(sys.argv[3]))
n = 0
try:
    while True:
        s.recv(2048); n += 1
except socket.timeout:
    pass
print(n, flush=True)
"""

UDP_SEND = """
import socket, sys
af = socket.AF_INET6 if ':' in sys.argv[1] else socket.AF_INET
s = socket.socket(af, socket.SOCK_DGRAM)
for _ in range(int(sys.argv[3])):
    s.sendto(b'x' * 32, (sys.argv[1], int(sys.argv[2])))
"""

TCP_SERVER = """
import socket, sys
af = socket.AF_INET6 if ':' in sys.argv[1] else socket.AF_INET
s = socket.socket(af, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(16)
print('ready', flush=True)
s.settimeout(float(sys.argv[3]))
try:
    while True:
        c, _ = s.accept(); c.sendall(b'hi'); c.close()
except socket.timeout:
    pass
"""

TCP_CONNECT = """
import socket, sys
af = socket.AF_INET6 if ':' in sys.argv[1] else socket.AF_INET
try:
    c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3]))
    print('ok' if c.recv(2) == b'hi' else 'bad')
except OSError as e:
    print('fail', e)
"""


@dataclass
class Result:
    ok: bool
    detail: str


def ping(ns: str, dst: str, count: int = 2, timeout: float = 1.0) -> Result:
    r = run_in(ns, ["ping", "-c", str(count), "-i", "0.2", "-W", str(timeout), dst], timeout=15)
    return Result(r.returncode == 0, f"ping {dst} from {ns}: rc={r.returncode} {r.stdout[-200:]}")


def _start(ns: str, script: str, *args: str) -> subprocess.Popen:
    p = subprocess.Popen(
        ["ip", "netns", "exec", ns, PY, "-c", script, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    line = p.stdout.readline()
    if line.strip() != "ready":
        p.kill()
        raise RuntimeError(f"server in {ns} did not start: {line} {p.stderr.read()}")
    return p


def udp_delivered(src_ns: str, dst_ns: str, dst: str, port: int, count: int = 50) -> int:
    """Send `count` datagrams; return how many reached a socket in dst_ns."""
    sink = _start(dst_ns, UDP_SINK, dst, str(port), "1.0")
    try:
        send = run_in(src_ns, [PY, "-c", UDP_SEND, dst, str(port), str(count)], timeout=15)
        assert send.returncode == 0, send.stderr
        out, err = sink.communicate(timeout=15)
    finally:
        sink.kill()
    lines = out.strip().splitlines()
    assert lines, f"UDP sink in {dst_ns} printed nothing: {err}"
    return int(lines[-1])


def tcp_connects(src_ns: str, dst_ns: str, dst: str, port: int, timeout: float = 1.0) -> Result:
    server = _start(dst_ns, TCP_SERVER, dst, str(port), str(timeout + 1))
    try:
        r = run_in(src_ns, [PY, "-c", TCP_CONNECT, dst, str(port), str(timeout)], timeout=15)
    finally:
        server.kill()
        server.wait()
    return Result(r.stdout.strip() == "ok", f"tcp {dst}:{port} from {src_ns}: {r.stdout}{r.stderr}")


def wait_for(predicate, timeout: float = 5.0, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def assert_spliced_count(counted: int, delivered: int, what: str) -> None:
    """sp_traffic's count against the bytes delivered (loader.VERDICT_RECOUNT says why it may
    exceed them)."""
    assert delivered <= counted <= delivered + VERDICT_RECOUNT, (
        f"{what}: sp_traffic counted {counted} bytes for {delivered} delivered")
