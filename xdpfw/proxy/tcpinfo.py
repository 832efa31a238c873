"""What user space can read of a spliced TCP socket without reading from it: queue lengths
(ioctl) and sequence-space counters (TCP_INFO). The engine uses them to know when a spliced
direction has flushed (half-close) and how much the kernel holds for a peer (limits.py)."""

from __future__ import annotations

import fcntl
import socket
import struct
import termios

TCP_CLOSE = 7  # tcp_info.tcpi_state
TCPI_BYTES_ACKED = 120  # offsets in struct tcp_info (stable uapi)
TCPI_BYTES_RECEIVED = 128


def inq(sock: socket.socket) -> int:
    """Bytes in the receive queue, not yet read (by us or by the verdict program)."""
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0" * 4))[0]


def outq(sock: socket.socket) -> int:
    """Bytes in the send queue: unsent and sent-but-unacked."""
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0]


def tcp_info(sock: socket.socket) -> bytes:
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)


def bytes_received(sock: socket.socket) -> int:
    return struct.unpack_from("Q", tcp_info(sock), TCPI_BYTES_RECEIVED)[0]


def bytes_written(sock: socket.socket) -> int:
    """Sequence space queued for sending so far: acked + still in the send queue.

    Acked is read first, so an ACK landing in between makes this undercount (safe: we wait
    a little longer), never overcount. Includes the SYN on an active open; callers subtract
    a baseline taken before the splice.
    """
    acked = struct.unpack_from("Q", tcp_info(sock), TCPI_BYTES_ACKED)[0]
    return acked + outq(sock)


def queued(src: socket.socket, dst: socket.socket, dst_base: int) -> int:
    """Bytes the kernel read from src (handed to the verdict) and not yet in dst's send queue:
    what waits on dst's psock. src is read first, so progress in between undercounts."""
    taken = bytes_received(src) - inq(src)
    return taken - (bytes_written(dst) - dst_base)


def is_closed(sock: socket.socket) -> bool:
    return tcp_info(sock)[0] == TCP_CLOSE
