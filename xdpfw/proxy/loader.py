"""Compile and load xdpfw/bpf/sockproxy.c with BCC, and drive its maps.

The only module of xdpfw.proxy that imports bcc. Each step that can fail raises its own typed
error carrying the text BCC and the kernel printed on the C-level stderr (fd 2): the clang
diagnostics, the map-creation errno or the verifier log.
"""

from __future__ import annotations

import contextlib
import ctypes as ct
import errno
import fcntl
import hashlib
import os
import socket
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

from xdpfw import errors
from xdpfw.dataplane.loader import captured_stderr
from xdpfw.errors import XdpfwError
from xdpfw.proxy import abi

SO_COOKIE = 57  # <asm-generic/socket.h>; the socket module does not export it
SO_SNDBUFFORCE = 32  # likewise; SO_SNDBUF beyond net.core.wmem_max (needs CAP_NET_ADMIN)
BPF_NOEXIST = 1
# Kernel attach types (enum bpf_attach_type) for programs attached to a sockhash.
SK_SKB_STREAM_PARSER = 4
SK_SKB_STREAM_VERDICT = 5
# The splice runs strparser + stream verdict. The kernel's other way, the verdict program
# alone (BPF_SK_SKB_VERDICT, skbs straight from tcp_read_skb()), is not offered: on this
# kernel (6.18.44) it now and then hands the program one 64 KiB skb twice, so the peer gets
# 65,160 bytes it was never sent (1-2% of 32 MiB streams, in either direction, the duplicate
# counted by sp_verdict itself; 0 of 380 with the stream parser; docs/perf.md, Socket proxy).
SPLICE_PROGRAMS: tuple[tuple[str, int], ...] = (
    ("sp_parser", SK_SKB_STREAM_PARSER),
    ("sp_verdict", SK_SKB_STREAM_VERDICT),
)

# SO_SNDBUF asked for on both spliced sockets (the kernel doubles it). When the peer's send
# buffer is full, the psock backlog worker that transmits redirected skbs re-arms itself
# with a one-jiffy timer, and write-space wake-ups are ignored while that timer is pending:
# each full send buffer costs up to 1/HZ of silence. The buffer must hold more than a jiffy
# of traffic (4 ms at HZ=250 is 10 MB at 20 Gbit/s). It is a ceiling, not an allocation:
# memory is only used while the receiving end is slower than the sending one.
SPLICE_SNDBUF = 8 * 1024 * 1024

# sp_traffic counts what sp_verdict redirects, and this kernel now and then runs the verdict
# twice on one skb (up to 64 KiB, GSO) while sending its bytes once: a count may exceed the
# bytes delivered by that much (docs/perf.md, Socket proxy), never fall short of them.
VERDICT_RECOUNT = 64 * 1024

# The self-test (SockProxyDataplane.self_test): one connection spliced over loopback in a
# private network namespace, a bulk chunk one way and a request/response exchange.
SELF_TEST_SERVICE = 0xFFFFFFFE  # sp_traffic key of the test connection (never a service id)
SELF_TEST_BULK = 1024 * 1024
SELF_TEST_MESSAGE = 1024
SELF_TEST_ROUNDS = 8
SELF_TEST_TIMEOUT = 5.0
CLONE_NEWNET = 0x40000000
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1


class SockProxyError(XdpfwError):
    """Base of the errors this module raises; `errno` is set when the kernel gave one."""

    def __init__(self, message: str, *, err: int | None = None, log: str = "") -> None:
        detail = f" [{errno.errorcode.get(err, err)}]" if err else ""
        tail = f"\n--- kernel/BCC output ---\n{log.rstrip()}" if log.strip() else ""
        super().__init__(f"{message}{detail}{tail}")
        # After super(): errors.CompileError and VerifierError set a `log` of their own.
        self.errno = err
        self.log = log


class CompileError(SockProxyError, errors.CompileError):
    """clang (inside BCC) could not compile sockproxy.c."""


class MapCreateError(SockProxyError):
    """The kernel refused to create one of the maps (e.g. no sockhash support, E2BIG)."""


class VerifierError(SockProxyError, errors.VerifierError):
    """The kernel refused a program; `log` holds the verifier log."""


class AttachError(SockProxyError):
    """A program loaded but could not be attached to the sockhash."""


class SpliceError(SockProxyError):
    """A socket pair could not be handed to the kernel (closed early, map full, ...)."""


class SelfTestError(SockProxyError):
    """The programs loaded, but a connection spliced through them did not carry its bytes
    intact (or the test could not be run)."""


def socket_cookie(sock: socket.socket) -> int:
    return struct.unpack("Q", sock.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8))[0]


@dataclass(frozen=True)
class SplicedPair:
    service_id: int
    client_cookie: int
    backend_cookie: int


@dataclass(frozen=True)
class TrafficCounters:
    """sp_traffic summed over CPUs."""

    bytes_to_backend: int = 0
    bytes_to_client: int = 0
    skbs_to_backend: int = 0
    skbs_to_client: int = 0
    no_peer: int = 0
    redirect_failed: int = 0
    empty_skbs: int = 0


@dataclass(frozen=True)
class ConnCounters:
    accepted: int = 0
    active: int = 0
    closed: int = 0
    backend_failures: int = 0
    relayed_in_userspace: int = 0
    queue_resets: int = 0
    limit_waits: int = 0
    idle_resets: int = 0
    client_refusals: int = 0


class SockProxyDataplane:
    """The loaded sockproxy programs and maps; one can serve many services.

    Thread-safe: the engine's loop thread splices while API threads read counters.
    """

    def __init__(self, *, max_sockets: int = abi.SP_MAX_SOCKETS,
                 max_services: int = abi.SP_MAX_SERVICES,
                 splice_sndbuf: int | None = SPLICE_SNDBUF,
                 source: Path = abi.PROGRAM_SOURCE) -> None:
        """splice_sndbuf: SO_SNDBUF for spliced sockets (None: leave the
        kernel's autotuning alone). source: the C file; only tests pass another."""
        from bcc import BPF

        self.splice_sndbuf = splice_sndbuf
        self.source = source
        self._lock = threading.Lock()
        self._attached: list[tuple[object, int]] = []
        cflags = [
            f"-I{abi.BPF_DIR}",
            f"-DSP_MAX_SOCKETS={int(max_sockets)}",
            f"-DSP_MAX_SERVICES={int(max_services)}",
        ]
        src = source.read_bytes()
        ct.set_errno(0)  # BCC reports map-creation failures only through errno
        with captured_stderr() as out:
            try:
                self.bpf = BPF(text=src, cflags=cflags)
            except Exception as e:
                err = ct.get_errno() or None
                raise self._classify_module_error(e, err, out, source) from e
        try:
            self._fns = {}
            for name, _ in SPLICE_PROGRAMS:
                failure: Exception | None = None
                ct.set_errno(0)
                with captured_stderr() as out:
                    try:
                        self._fns[name] = self.bpf.load_func(name.encode(), BPF.SK_SKB)
                    except Exception as e:
                        failure, err = e, ct.get_errno() or None
                if failure is not None:
                    raise VerifierError(f"kernel refused sk_skb program {name} ({failure})",
                                        err=err, log=out[0]) from failure
            self._fd = {
                name: self._map_fd(name)
                for name in ("sp_socks", "sp_splice", "sp_peers", "sp_traffic", "sp_conns")
            }
            for name, attach_type in SPLICE_PROGRAMS:
                try:
                    BPF.attach_func(self._fns[name], self._fd["sp_splice"], attach_type)
                except Exception as e:
                    raise AttachError(f"cannot attach {name} to sp_splice ({e})",
                                      err=ct.get_errno() or None) from e
                self._attached.append((self._fns[name], attach_type))
            self._traffic = self.bpf[b"sp_traffic"]
            self._conns = self.bpf[b"sp_conns"]
            self._peers = self.bpf[b"sp_peers"]
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _classify_module_error(e: Exception, err: int | None, out: list[str],
                               source: Path) -> SockProxyError:
        """BCC raises one message for clang failures and map-creation failures alike."""
        text = "".join(out)
        if "error:" in text or not err:
            return CompileError(f"cannot compile {source.name} ({e})", err=err,
                                log=text)
        # Compiled fine, then the kernel refused a map (errno from bpf(BPF_MAP_CREATE)).
        return MapCreateError(f"kernel refused to create the sockproxy maps ({e})", err=err,
                              log=text)

    def _map_fd(self, name: str) -> int:
        from bcc import lib

        fd = lib.bpf_table_fd(self.bpf.module, name.encode())
        if fd < 0:
            raise MapCreateError(f"map {name} missing from the loaded module")
        return fd

    # --- sockets ---------------------------------------------------------------------------

    def splice(self, service_id: int, client: socket.socket,
               backend: socket.socket) -> SplicedPair:
        """Hand an established client/backend pair to the kernel.

        Order matters (see sockproxy.c): targets first, then peers, then the programs.
        Afterwards both receive queues are kicked so bytes that arrived before the splice
        are forwarded too. On failure everything inserted is removed and SpliceError raised;
        the sockets (untouched but for SO_SNDBUF) can be relayed in user space.
        """
        pair = SplicedPair(service_id, socket_cookie(client), socket_cookie(backend))
        if self.splice_sndbuf:
            try:
                for sock in (client, backend):
                    set_sndbuf(sock, self.splice_sndbuf)
            except OSError as e:
                raise SpliceError(f"cannot set SO_SNDBUF: {e.strerror}", err=e.errno) from e
        inserted: list[tuple[str, int]] = []
        try:
            for cookie, sock in ((pair.client_cookie, client), (pair.backend_cookie, backend)):
                self._sock_insert("sp_socks", cookie, sock)
                inserted.append(("sp_socks", cookie))
            with self._lock:
                self._peers[ct.c_uint64(pair.client_cookie)] = abi.SpPeer(
                    pair.backend_cookie, service_id, abi.SP_DIR_TO_BACKEND)
                self._peers[ct.c_uint64(pair.backend_cookie)] = abi.SpPeer(
                    pair.client_cookie, service_id, abi.SP_DIR_TO_CLIENT)
            for cookie, sock in ((pair.client_cookie, client), (pair.backend_cookie, backend)):
                self._sock_insert("sp_splice", cookie, sock)
                inserted.append(("sp_splice", cookie))
        except BaseException:
            for name, cookie in reversed(inserted):
                self._sock_delete(name, cookie)
            self._forget_peers(pair)
            raise
        for sock in (client, backend):
            kick_receive_queue(sock)
        return pair

    def self_test(self, timeout: float | None = None) -> None:
        """Splice one TCP connection through these programs and check that bytes cross it
        intact both ways: SELF_TEST_BULK bytes client -> backend, then SELF_TEST_ROUNDS
        request/response exchanges of SELF_TEST_MESSAGE bytes, each counted by sp_traffic.
        Over loopback in a network namespace of its own (a thread that unshares one), so it
        touches no interface of the host. Raises SelfTestError saying what differed.
        timeout: for each socket operation (default SELF_TEST_TIMEOUT)."""
        timeout = SELF_TEST_TIMEOUT if timeout is None else timeout
        outcome: list[BaseException | None] = []
        t = threading.Thread(target=lambda: outcome.append(self._self_test(timeout)),
                             name="xdpfw-sockproxy-selftest", daemon=True)
        t.start()
        t.join(timeout + 5)
        if not outcome:
            raise SelfTestError(f"self-test did not finish within {timeout + 5:.0f}s")
        if outcome[0] is not None:
            raise outcome[0]

    def _self_test(self, timeout: float) -> BaseException | None:
        """The self-test's thread: returns the error instead of raising it."""
        libc = ct.CDLL(None, use_errno=True)
        if libc.unshare(CLONE_NEWNET) != 0:
            return SelfTestError("self-test: cannot make a network namespace",
                                 err=ct.get_errno())
        socks: list[socket.socket] = []

        def tcp() -> socket.socket:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.settimeout(timeout)
            socks.append(s)
            return s

        def recv_exactly(s: socket.socket, n: int) -> bytes:
            chunks, got = [], 0
            while got < n:
                chunk = s.recv(min(n - got, 1 << 20))
                if not chunk:
                    break
                chunks.append(chunk)
                got += len(chunk)
            return b"".join(chunks)

        pair = None
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as ctl:
                fcntl.ioctl(ctl, SIOCSIFFLAGS, struct.pack("16sH", b"lo", IFF_UP))
            listeners = [tcp(), tcp()]
            for lsock in listeners:
                lsock.bind(("127.0.0.1", 0))
                lsock.listen(1)
            client, backend_side = tcp(), tcp()
            client.connect(listeners[0].getsockname())
            appliance_side = listeners[0].accept()[0]
            backend_side.connect(listeners[1].getsockname())
            backend = listeners[1].accept()[0]
            socks += [appliance_side, backend]
            for s in (appliance_side, backend):
                s.settimeout(timeout)
            self.reset_service(SELF_TEST_SERVICE)
            pair = self.splice(SELF_TEST_SERVICE, appliance_side, backend_side)
            bulk = hashlib.shake_128(b"xdpfw self-test").digest(SELF_TEST_BULK)
            client.sendall(bulk)
            got = recv_exactly(backend, len(bulk))
            if got != bulk:
                return SelfTestError(f"self-test: the backend received {len(got)} bytes of "
                                     f"a {len(bulk)}-byte stream, "
                                     f"{'intact' if bulk.startswith(got) else 'corrupted'}")
            for i in range(SELF_TEST_ROUNDS):
                request = bytes([i]) * SELF_TEST_MESSAGE
                client.sendall(request)
                if recv_exactly(backend, len(request)) != request:
                    return SelfTestError(f"self-test: request {i} did not reach the backend")
                backend.sendall(request[::-1])
                if recv_exactly(client, len(request)) != request[::-1]:
                    return SelfTestError(f"self-test: response {i} did not reach the client")
            want = (SELF_TEST_BULK + SELF_TEST_ROUNDS * SELF_TEST_MESSAGE,
                    SELF_TEST_ROUNDS * SELF_TEST_MESSAGE)
            t = self.traffic(SELF_TEST_SERVICE)
            counted = (t.bytes_to_backend, t.bytes_to_client)
            if not all(w <= c <= w + VERDICT_RECOUNT for c, w in zip(counted, want, strict=True)) \
                    or t.no_peer or t.redirect_failed:
                return SelfTestError(f"self-test: bytes arrived, but sp_traffic counted {t}, "
                                     f"expected {want} bytes to backend and to client")
            return None
        except (OSError, SockProxyError) as e:
            return e if isinstance(e, SockProxyError) else SelfTestError(
                f"self-test failed: {e}", err=e.errno)
        finally:
            for s in socks:
                s.close()
            if pair is not None:
                self.unsplice(pair)
            self.reset_service(SELF_TEST_SERVICE)

    def unsplice(self, pair: SplicedPair) -> None:
        """Drop what the kernel does not drop by itself; call once both sockets are closed."""
        for name in ("sp_splice", "sp_socks"):
            for cookie in (pair.client_cookie, pair.backend_cookie):
                self._sock_delete(name, cookie)  # normally already gone with the socket
        self._forget_peers(pair)

    def _forget_peers(self, pair: SplicedPair) -> None:
        with self._lock:
            for cookie in (pair.client_cookie, pair.backend_cookie):
                with contextlib.suppress(KeyError):
                    del self._peers[ct.c_uint64(cookie)]

    def _sock_insert(self, name: str, cookie: int, sock: socket.socket) -> None:
        from bcc import lib

        ret = lib.bpf_update_elem(self._fd[name], ct.byref(ct.c_uint64(cookie)),
                                  ct.byref(ct.c_int(sock.fileno())), BPF_NOEXIST)
        if ret < 0:
            err = -ret if ret < -1 else ct.get_errno()
            reason = {
                errno.EOPNOTSUPP: "socket is not an established TCP socket (peer already closed?)",
                errno.E2BIG: "sockhash is full",
                errno.ENOMEM: "sockhash is full",
                errno.EEXIST: "socket already spliced",
            }.get(err, os.strerror(err))
            raise SpliceError(f"cannot insert socket into {name}: {reason}", err=err)

    def _sock_delete(self, name: str, cookie: int) -> None:
        from bcc import lib

        lib.bpf_delete_elem(self._fd[name], ct.byref(ct.c_uint64(cookie)))  # ENOENT is fine

    def socket_count(self, name: str) -> int:
        """Entries in sp_socks or sp_splice (walked with BPF_MAP_GET_NEXT_KEY)."""
        from bcc import lib

        count, key, nxt = 0, None, ct.c_uint64()
        while lib.bpf_get_next_key(self._fd[name], None if key is None else ct.byref(key),
                                   ct.byref(nxt)) == 0:
            count += 1
            key = ct.c_uint64(nxt.value)
        return count

    def peer_count(self) -> int:
        with self._lock:
            return len(self._peers)

    # --- counters --------------------------------------------------------------------------

    def traffic(self, service_id: int) -> TrafficCounters:
        key = self._traffic.Key(service_id)
        try:
            per_cpu = self._traffic[key]
        except KeyError:
            return TrafficCounters()
        return TrafficCounters(**{
            f: sum(getattr(v, f) for v in per_cpu) for f, _ in abi.SpTraffic._fields_
        })

    def conns(self, service_id: int) -> ConnCounters:
        with self._lock:
            try:
                v = self._conns[self._conns.Key(service_id)]
            except KeyError:
                return ConnCounters()
            return ConnCounters(**{f: getattr(v, f) for f, _ in abi.SpConns._fields_})

    def add_conns(self, service_id: int, **deltas: int) -> None:
        """Apply deltas to sp_conns; user space is its only writer, under this lock."""
        with self._lock:
            key = self._conns.Key(service_id)
            try:
                v = self._conns[key]
            except KeyError:
                v = self._conns.Leaf()
            for f, d in deltas.items():
                setattr(v, f, getattr(v, f) + d)
            self._conns[key] = v

    def reset_service(self, service_id: int) -> None:
        with self._lock:
            for t in (self._traffic, self._conns):
                with contextlib.suppress(KeyError):
                    del t[t.Key(service_id)]

    def close(self) -> None:
        """Detach and unload; idempotent."""
        from bcc import BPF

        bpf = getattr(self, "bpf", None)
        if bpf is None:
            return
        for fn, attach_type in self._attached:
            with contextlib.suppress(Exception):
                BPF.detach_func(fn, self._fd["sp_splice"], attach_type)
        self._attached.clear()
        bpf.cleanup()
        self.bpf = None


def set_sndbuf(sock: socket.socket, size: int) -> None:
    """SO_SNDBUFFORCE when privileged, else SO_SNDBUF (capped by net.core.wmem_max)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, size)
    except PermissionError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)


def kick_receive_queue(sock: socket.socket) -> None:
    """Make the kernel look at bytes already queued on a socket that was just spliced.

    The verdict (or stream parser) only runs from the socket's data_ready callback, which
    fires when new data arrives; bytes queued before the splice would wait for the next
    segment (forever, for a request/response protocol). Setting SO_RCVLOWAT calls
    tcp_data_ready(), which invokes data_ready when the queue holds at least that many bytes.
    """
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
