"""systemd's readiness protocol (sd_notify(3)), without a compiled dependency: one datagram
to $NOTIFY_SOCKET. An abstract socket's name starts with '@'. Without $NOTIFY_SOCKET (not run
by a Type=notify unit) every call does nothing.

The unit is Type=notify, so `systemctl start xdpfw` returns, and units ordered after it start,
only once the API answers: start-up compiles the program and restores state first (~6 s).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time

import httpx

log = logging.getLogger(__name__)


def notify(state: str) -> bool:
    """Send `state` (e.g. "READY=1"); False when there is no one to tell."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall(state.encode())
    except OSError as e:
        log.warning("could not notify systemd (%s): %s", state.split("\n", 1)[0], e)
        return False
    return True


def ready_when_answering(api_socket: str, stop: threading.Event,
                         timeout_s: float = 300.0) -> threading.Thread | None:
    """Send READY=1 once GET /healthz answers on the API's unix socket: the server is up
    only after its event loop starts, which this process cannot otherwise see from here."""
    if not os.environ.get("NOTIFY_SOCKET"):
        return None

    def wait() -> None:
        deadline = time.monotonic() + timeout_s
        transport = httpx.HTTPTransport(uds=api_socket)
        with httpx.Client(transport=transport, base_url="http://xdpfw", timeout=5.0) as c:
            while not stop.is_set() and time.monotonic() < deadline:
                try:
                    r = c.get("/healthz")
                except httpx.TransportError:
                    stop.wait(0.05)
                    continue
                if r.status_code == 200:
                    h = r.json()
                    notify(f"READY=1\nSTATUS=guarding {h['interfaces']} interfaces with "
                           f"{h['rules']} rules; API on {api_socket}\nMAINPID={os.getpid()}")
                    return
                stop.wait(0.05)
        log.warning("the API did not answer within %.0f s: systemd was not told it is ready",
                    timeout_s)

    t = threading.Thread(target=wait, name="xdpfw-sdnotify", daemon=True)
    t.start()
    return t
