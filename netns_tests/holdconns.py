"""Open N TCP connections to HOST:PORT from address SRC and hold them, sending at most a
partial request line (a client that never authenticates). One process can hold fewer than
its RLIMIT_NOFILE, so tests spread a flood over several.

    python -m netns_tests.holdconns HOST PORT SRC N

Prints one JSON line {"opened", "handshakes", "seconds"} once the handshakes are done (or
after 15 s), then holds everything until stdin closes or 60 s pass.
"""

from __future__ import annotations

import contextlib
import errno
import json
import resource
import select
import socket
import sys
import time

IP_BIND_ADDRESS_NO_PORT = 24  # pick the port at connect(): per (src, dst) pair, not global


def main(host: str, port: int, src: str, n: int) -> None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    start = time.monotonic()
    socks = []
    for _ in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        s.bind((src, 0))
        s.setblocking(False)
        s.connect_ex((host, port))
        socks.append(s)
    pending = {s.fileno(): s for s in socks}
    poller = select.poll()
    for fd in pending:
        poller.register(fd, select.POLLOUT)
    handshakes = 0
    deadline = start + 15
    while pending and time.monotonic() < deadline:
        for fd, _ in poller.poll(200):
            s = pending.pop(fd)
            poller.unregister(fd)
            err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err in (0, errno.ECONNRESET, errno.EPIPE):  # reset: accepted, then closed
                handshakes += 1
                if err == 0 and handshakes % 2:
                    with contextlib.suppress(OSError):
                        s.send(b"GET / HTTP/1.1\r\n")  # ... and never the rest
    print(json.dumps({"opened": n, "handshakes": handshakes,
                      "seconds": round(time.monotonic() - start, 2)}), flush=True)
    select.select([sys.stdin], [], [], 60)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]))
