"""Shared pieces of the benchmarks: they drive xdpfw only through its public surfaces.

- `Daemon`: `xdpfw serve` started as scripts/appliance.sh starts it (the venv's `xdpfw serve`,
  default settings); only the socket, state and pin paths are its own, so it runs beside
  tests and other daemons. `Api` talks to it over its unix socket (HTTP/1.1, stdlib only).
- `Netns`: namespaces and veths through `ip` (unique names, removed at the end).
- `bpftool_run`: `bpftool prog run` of a program by id, the per-packet figure.
- `RefProg`: a reference program of scripts/bench_progs/ loaded with BCC in this process (the
  program lives while this process holds it); `bpf_*`: the few raw bpf() calls needed to fill
  a reference map and to time a program without bpftool (calibration).
- Frames, prefix sets and the probe addresses that hit or miss them.
- `Recorder`: one JSON object per line, appended and flushed as each result is known.

Nothing here imports xdpfw: the data plane and the service are being changed by others, and a
benchmark that reaches into them measures something nobody runs.
"""

from __future__ import annotations

import contextlib
import ctypes
import http.client
import json
import math
import os
import random
import shlex
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH_PROGS = ROOT / "scripts" / "bench_progs"


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class BenchError(RuntimeError):
    """A step failed; the message says which command and what it printed."""


def sh(argv: Sequence[str], what: str, timeout: float = 120, check: bool = True,
       ) -> subprocess.CompletedProcess:
    try:
        proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise BenchError(f"{what}: `{shlex.join(argv)}` still running after {timeout} s") from e
    if check and proc.returncode != 0:
        raise BenchError(
            f"{what}: `{shlex.join(argv)}` exited {proc.returncode}\n"
            f"stdout: {proc.stdout.strip()[-2000:]}\nstderr: {proc.stderr.strip()[-2000:]}"
        )
    return proc


# -- scratch: everything the run creates, removed at the end even on failure ------------------


class Scratch:
    """Unique names for namespaces, pin directories and files; `cleanup()` removes whatever
    is left of them (each phase removes its own first; this is the safety net)."""

    def __init__(self, keep_tmp: bool = False) -> None:
        self.tag = uuid.uuid4().hex[:6]
        self.tmp = Path(tempfile.mkdtemp(prefix=f"xdpfw-bench-{self.tag}-"))
        self.keep_tmp = keep_tmp
        self.namespaces: list[str] = []
        self.pin_dirs: list[str] = []
        self.daemons: list[Daemon] = []
        self._n = 0

    def name(self, what: str) -> str:
        self._n += 1
        return f"{what}-{self._n}" if what[-1:].isdigit() else f"{what}{self._n}"

    def dir(self, what: str) -> Path:
        d = self.tmp / self.name(what)
        d.mkdir(mode=0o700)
        return d

    def pin_dir(self, what: str) -> str:
        path = f"/sys/fs/bpf/xdpfw-bench-{self.tag}-{self.name(what)}"
        self.pin_dirs.append(path)
        return path

    def netns_name(self, what: str) -> str:
        # ip netns names are file names; keep them short, unique per run and recognisable.
        return f"xb{self.tag}{self.name(what)}"

    def cleanup(self) -> list[str]:
        """Best effort; returns what could not be removed."""
        problems: list[str] = []
        for d in list(self.daemons):
            with contextlib.suppress(Exception):
                d.stop()
            if d.running():
                problems.append(f"daemon pid {d.proc.pid} still running")
        for ns in list(self.namespaces):
            netns_del(ns)
            if ns in netns_list():
                problems.append(f"namespace {ns} still there")
        for path in self.pin_dirs:
            shutil.rmtree(path, ignore_errors=True)
            if os.path.exists(path):
                problems.append(f"pin dir {path} still there")
        if not self.keep_tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)
        return problems


# -- namespaces and links, through `ip` --------------------------------------------------------


def netns_list() -> set[str]:
    out = sh(["ip", "-j", "netns", "list"], "listing namespaces", check=False).stdout
    try:
        return {n["name"] for n in json.loads(out or "[]")}
    except json.JSONDecodeError:
        return set()


def netns_add(scratch: Scratch, what: str) -> str:
    """A new namespace with IPv6 off (no DAD or MLD frames reach the guarded interfaces, so
    the daemon's interface counters move only with the benchmark's own runs)."""
    ns = scratch.netns_name(what)
    sh(["ip", "netns", "add", ns], f"creating namespace {ns}")
    scratch.namespaces.append(ns)
    sh(["ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1",
        "net.ipv6.conf.default.disable_ipv6=1"], f"turning IPv6 off in {ns}")
    sh(["ip", "-n", ns, "link", "set", "lo", "up"], f"lo up in {ns}")
    return ns


def netns_del(ns: str) -> None:
    sh(["ip", "netns", "del", ns], f"removing namespace {ns}", check=False)


def veth(ns_a: str, if_a: str, ns_b: str, if_b: str, addr_a: str | None = None,
         addr_b: str | None = None) -> None:
    """A veth pair, if_a in ns_a and if_b in ns_b, both up, with optional addresses."""
    sh(["ip", "-n", ns_a, "link", "add", if_a, "type", "veth", "peer", "name", if_b, "netns",
        ns_b], f"creating veth {if_a}/{if_b}")
    for ns, ifname, addr in ((ns_a, if_a, addr_a), (ns_b, if_b, addr_b)):
        if addr:
            sh(["ip", "-n", ns, "addr", "add", addr, "dev", ifname], f"address on {ifname}")
        sh(["ip", "-n", ns, "link", "set", ifname, "up"], f"{ifname} up")


def link_json(ns: str, ifname: str, stats: bool = False) -> dict:
    argv = ["ip", "-j", *(["-s"] if stats else []), "-n", ns, "link", "show", "dev", ifname]
    return json.loads(sh(argv, f"reading {ifname} in {ns}").stdout)[0]


def xdp_prog_id(ns: str, ifname: str) -> int | None:
    xdp = link_json(ns, ifname).get("xdp") or {}
    prog = xdp.get("prog") or {}
    return prog.get("id")


def rx_packets(ns: str, ifname: str) -> int:
    return int(link_json(ns, ifname, stats=True)["stats64"]["rx"]["packets"])


def ip_in_receives(ns: str) -> int:
    """IpInReceives of the namespace: packets that reached its IP stack."""
    text = sh(["ip", "netns", "exec", ns, "cat", "/proc/net/snmp"], "reading /proc/net/snmp"
              ).stdout
    rows = [ln.split() for ln in text.splitlines() if ln.startswith("Ip:")]
    return int(rows[1][rows[0].index("InReceives")])


# -- the daemon and its API --------------------------------------------------------------------


class ApiError(BenchError):
    def __init__(self, method: str, path: str, status: int, body: str) -> None:
        super().__init__(f"{method} {path}: HTTP {status}: {body[:500]}")
        self.status = status


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("xdpfw", timeout=timeout)
        self.socket_path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        s.connect(self.socket_path)
        self.sock = s


class Api:
    """The REST API over the unix socket, one kept-alive connection (as a client library or
    `curl --unix-socket` in a loop with keep-alive would use it). uvicorn closes a connection
    idle for 5 s, so one idle for IDLE_S is replaced before it is used."""

    IDLE_S = 2.0

    def __init__(self, socket_path: str, timeout: float = 300) -> None:
        self.socket_path = socket_path
        self.timeout = timeout
        self._conn: _UnixConnection | None = None
        self._last = 0.0

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def request(self, method: str, path: str, *, json_body=None, data: bytes | None = None,
                ctype: str | None = None, ok: Iterable[int] = (200, 201, 202)):
        headers = {}
        if json_body is not None:
            data = json.dumps(json_body).encode()
            ctype = "application/json"
        if ctype:
            headers["Content-Type"] = ctype
        if self._conn is not None and time.monotonic() - self._last > self.IDLE_S:
            self.close()
        if self._conn is None:
            self._conn = _UnixConnection(self.socket_path, self.timeout)
        try:
            self._conn.request(method, path, body=data, headers=headers)
            resp = self._conn.getresponse()
            raw = resp.read()
        except BaseException:  # a half-read answer (Ctrl-C included) spoils the connection
            self.close()
            raise
        self._last = time.monotonic()
        if resp.getheader("connection", "").lower() == "close":
            self.close()
        text = raw.decode(errors="replace")
        if resp.status not in ok:
            raise ApiError(method, path, resp.status, text)
        ctype_in = resp.getheader("content-type", "")
        return json.loads(text) if "json" in ctype_in and text else text

    def get(self, path: str, **kw):
        return self.request("GET", path, **kw)

    def post(self, path: str, **kw):
        return self.request("POST", path, **kw)

    def put(self, path: str, **kw):
        return self.request("PUT", path, **kw)

    def delete(self, path: str, **kw):
        return self.request("DELETE", path, **kw)


def xdpfw_argv() -> list[str]:
    """The command scripts/appliance.sh runs: the venv's `xdpfw` entry point."""
    exe = ROOT / ".venv" / "bin" / "xdpfw"
    if exe.exists():
        return [str(exe)]
    return [sys.executable, "-m", "xdpfw"]


class Daemon:
    """`xdpfw serve` with its defaults. Only --socket, --state-dir and --bpffs-dir differ from
    a default start (and --config when a phase needs a setting, which it then records)."""

    def __init__(self, scratch: Scratch, what: str, config: str | None = None) -> None:
        self.dir = scratch.dir(f"daemon-{what}-")
        self.socket = str(self.dir / "api.sock")
        self.state_dir = str(self.dir / "state")
        self.pin_dir = scratch.pin_dir(what)
        self.log_path = self.dir / "serve.log"
        self.config_text = config
        argv = [*xdpfw_argv(), "serve"]
        if config is not None:
            cfg = self.dir / "config.toml"
            cfg.write_text(config)
            argv += ["--config", str(cfg)]
        argv += ["--socket", self.socket, "--state-dir", self.state_dir,
                 "--bpffs-dir", self.pin_dir]
        self.argv = argv
        self.command = shlex.join(argv)
        scratch.daemons.append(self)
        self._scratch = scratch
        with self.log_path.open("w") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                                         start_new_session=True)
        self.api = Api(self.socket)
        self.started = time.monotonic()
        self.healthy_after: float | None = None
        self.stopped_by: str | None = None

    def running(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, n: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        return ""

    def wait_healthy(self, timeout: float = 180) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.running():
                raise BenchError(f"`{self.command}` exited {self.proc.returncode}:\n"
                                 f"{self.log_tail()}")
            with contextlib.suppress(OSError, http.client.HTTPException, ApiError):
                self.api.get("/healthz")
                self.healthy_after = time.monotonic() - self.started
                return self.healthy_after
            time.sleep(0.1)
        raise BenchError(f"`{self.command}` not healthy after {timeout} s:\n{self.log_tail()}")

    def memory(self) -> dict[str, int]:
        """VmRSS and VmHWM of the daemon process, in KiB."""
        out = {}
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    out[key] = int(rest.split()[0])
        return out

    def attach(self, ifname: str, netns: str, mode: str = "generic") -> dict:
        return self.api.post("/api/v1/interfaces",
                             json_body={"name": ifname, "netns": netns, "mode": mode})

    def prog_id(self, ifname: str, netns: str) -> int:
        """The program attached to ifname, as `ip link` shows it; checked against what the
        daemon says it attached (GET /api/v1/program), so a figure is of that program."""
        seen = xdp_prog_id(netns, ifname)
        prog = self.api.get("/api/v1/program")
        said = [i for i in prog["interfaces"] if i["name"] == ifname and i["netns"] == netns]
        if not said or seen is None or said[0]["prog_id"] != seen:
            raise BenchError(f"{ifname} in {netns}: ip link shows program {seen}, the daemon "
                             f"says {said}")
        return seen

    def iface_counters(self, ifname: str, netns: str) -> dict[str, int]:
        for i in self.api.get("/api/v1/stats")["interfaces"]:
            if i["name"] == ifname and i["netns"] == netns:
                return {k: i[k]["packets"] for k in ("passed", "dropped", "forwarded")}
        raise BenchError(f"GET /api/v1/stats has no interface {ifname} in {netns}")

    def bulk_text(self, text: str, action: str = "drop") -> tuple[float, dict]:
        """POST /api/v1/rules/bulk with a text/plain blocklist; (seconds, answer)."""
        t0 = time.perf_counter()
        r = self.api.post(f"/api/v1/rules/bulk?action={action}", data=text.encode(),
                          ctype="text/plain", ok=(201,))
        return time.perf_counter() - t0, r

    def stop(self) -> None:
        """POST /api/v1/shutdown with detach (every interface detached, pins removed), then
        SIGTERM, then SIGKILL; then the pin and state directories go."""
        if self.running():
            steps = [(signal.SIGTERM, 15), (signal.SIGKILL, 10)]
            try:
                self.api.post("/api/v1/shutdown", json_body={"detach": True}, ok=(202,))
                steps.insert(0, (None, 30))
            except Exception as e:
                log(f"daemon {self.proc.pid}: POST /api/v1/shutdown failed ({e}): SIGTERM")
            self.api.close()
            for sig, wait in steps:
                if sig is not None and self.running():
                    with contextlib.suppress(ProcessLookupError):
                        self.proc.send_signal(sig)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(timeout=wait)
                if not self.running():
                    self.stopped_by = "POST /api/v1/shutdown" if sig is None else sig.name
                    break
        self.api.close()
        shutil.rmtree(self.pin_dir, ignore_errors=True)
        shutil.rmtree(self.state_dir, ignore_errors=True)
        if self in self._scratch.daemons and not self.running():
            self._scratch.daemons.remove(self)


# -- running a program: bpftool prog run -------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One program and one frame; `expect` is the XDP action it must return (a wrong verdict
    means a wrong benchmark, so it fails the phase)."""

    name: str
    prog_id: int
    frame: Path
    expect: int


XDP_ABORTED, XDP_DROP, XDP_PASS, XDP_TX, XDP_REDIRECT = range(5)
XDP_NAMES = {0: "XDP_ABORTED", 1: "XDP_DROP", 2: "XDP_PASS", 3: "XDP_TX", 4: "XDP_REDIRECT"}


def bpftool_run(prog_id: int, frame: Path, repeat: int, cpu: int | None) -> tuple[int, float]:
    """(XDP action, ns per run) of `bpftool prog run` (the kernel's BPF_PROG_TEST_RUN average
    over `repeat` runs), pinned to `cpu` with taskset when given."""
    argv = ["bpftool", "-j", "prog", "run", "id", str(prog_id), "data_in", str(frame),
            "repeat", str(repeat)]
    if cpu is not None:
        argv = ["taskset", "-c", str(cpu), *argv]
    out = sh(argv, f"bpftool prog run id {prog_id}", timeout=120).stdout
    r = json.loads(out)
    return int(r["retval"]), float(r["duration"])


@dataclass
class Stat:
    median: float
    lo: float
    hi: float
    samples: list[float] = field(default_factory=list)

    @classmethod
    def of(cls, values: Sequence[float]) -> Stat:
        return cls(statistics.median(values), min(values), max(values), list(values))

    def json(self) -> dict:
        return {"median": self.median, "min": self.lo, "max": self.hi, "samples": self.samples}


def measure(cases: Sequence[Case], runs: int, repeat: int, cpu: int | None,
            between: Callable[[Case], None] | None = None) -> dict[str, Stat]:
    """Median ns per packet of each case over `runs` calls of `repeat`; the cases are
    interleaved (round r runs every case once), so drift on the shared machine falls on all
    of them alike. Every call's verdict is checked."""
    samples: dict[str, list[float]] = {c.name: [] for c in cases}
    for _ in range(runs):
        for c in cases:
            if between is not None:
                between(c)
            got, ns = bpftool_run(c.prog_id, c.frame, repeat, cpu)
            if got != c.expect:
                raise BenchError(f"{c.name}: program {c.prog_id} returned "
                                 f"{XDP_NAMES.get(got, got)}, expected {XDP_NAMES[c.expect]}")
            samples[c.name].append(ns)
    return {k: Stat.of(v) for k, v in samples.items()}


# -- raw bpf(): test runs without bpftool, and filling reference maps --------------------------

_SYS_BPF = {"x86_64": 321, "aarch64": 280}.get(os.uname().machine, 321)
BPF_MAP_UPDATE_ELEM, BPF_PROG_TEST_RUN, BPF_MAP_UPDATE_BATCH = 2, 10, 26
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _bpf(cmd: int, attr: bytes) -> bytes:
    buf = ctypes.create_string_buffer(attr, max(len(attr), 128))
    if _libc.syscall(_SYS_BPF, cmd, buf, len(attr)) < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"bpf(cmd {cmd}): {os.strerror(err)}")
    return buf.raw


def bpf_test_run(fd: int, data: bytes, repeat: int) -> tuple[int, int]:
    """(retval, ns per run): BPF_PROG_TEST_RUN straight from this process."""
    din = ctypes.create_string_buffer(data, len(data))
    dout = ctypes.create_string_buffer(len(data) + 256)
    attr = struct.pack("<IIIIQQIIIIQQIII", fd, 0, len(data), len(dout), ctypes.addressof(din),
                       ctypes.addressof(dout), repeat, 0, 0, 0, 0, 0, 0, 0, 0)
    raw = _bpf(BPF_PROG_TEST_RUN, attr)
    _fd, retval, _, _, _, _, _, duration = struct.unpack_from("<IIIIQQII", raw)
    return retval, duration


def bpf_update_many(map_fd: int, keys: bytes, values: bytes, count: int, chunk: int = 65536,
                    ) -> None:
    """Write count key/value pairs (packed back to back) with BPF_MAP_UPDATE_BATCH, chunked;
    element by element where the map has no batch operation."""
    ksz, vsz = len(keys) // count, len(values) // count
    for start in range(0, count, chunk):
        n = min(chunk, count - start)
        kb = ctypes.create_string_buffer(keys[start * ksz:(start + n) * ksz], n * ksz)
        vb = ctypes.create_string_buffer(values[start * vsz:(start + n) * vsz], n * vsz)
        attr = struct.pack("<QQQQIIQQ", 0, 0, ctypes.addressof(kb), ctypes.addressof(vb), n,
                           map_fd, 0, 0)
        try:
            _bpf(BPF_MAP_UPDATE_BATCH, attr)
        except OSError as e:
            if e.errno not in (22, 95, 524):  # EINVAL, EOPNOTSUPP, ENOTSUPP: no batch op
                raise
            for i in range(n):
                attr = struct.pack("<IIQQQ", map_fd, 0, ctypes.addressof(kb) + i * ksz,
                                   ctypes.addressof(vb) + i * vsz, 0)
                _bpf(BPF_MAP_UPDATE_ELEM, attr)


def scratch_map(scratch: Scratch, kind: str, key_size: int, value_size: int, entries: int,
                ) -> int:
    """A fresh map made by `bpftool map create` (no preallocation), as an fd of this process;
    its pin is removed at once, so the map goes when the fd is closed."""
    pin = f"{scratch.pin_dir('map')}-{kind}"
    scratch.pin_dirs.append(pin)
    sh(["bpftool", "map", "create", pin, "type", kind, "key", str(key_size), "value",
        str(value_size), "entries", str(entries), "name", f"bench_{kind}"[:15], "flags", "1"],
       f"creating a {kind} map")
    path = ctypes.create_string_buffer(pin.encode())
    try:
        fd = _bpf_fd(7, struct.pack("<QII", ctypes.addressof(path), 0, 0))
    finally:
        os.unlink(pin)
    return fd


def _bpf_fd(cmd: int, attr: bytes) -> int:
    """bpf() for commands that return a new fd (BPF_OBJ_GET = 7)."""
    buf = ctypes.create_string_buffer(attr, max(len(attr), 128))
    fd = _libc.syscall(_SYS_BPF, cmd, buf, len(attr))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"bpf(cmd {cmd}): {os.strerror(err)}")
    return int(fd)


def fd_prog_id(fd: int) -> int:
    with open(f"/proc/self/fdinfo/{fd}") as f:
        for line in f:
            if line.startswith("prog_id:"):
                return int(line.split()[1])
    raise BenchError(f"fd {fd} is not a BPF program")


class RefProg:
    """A program of scripts/bench_progs/ compiled and loaded with BCC in this process. It is
    not pinned: it lives while this process does (or while an interface holds it)."""

    def __init__(self, name: str, cflags: Sequence[str] = ()) -> None:
        from bcc import BPF  # Debian's python3-bpfcc, which scripts/setup.sh installs

        self.name = name
        self.source = BENCH_PROGS / f"{name}.c"
        self.bpf = BPF(src_file=str(self.source).encode(), cflags=list(cflags))
        self.fd = self.bpf.load_func(name.encode(), BPF.XDP).fd
        self.id = fd_prog_id(self.fd)

    def map_fd(self, name: str) -> int:
        return self.bpf[name.encode()].map_fd

    def close(self) -> None:
        self.bpf.cleanup()


# -- frames -----------------------------------------------------------------------------------

DST_MAC, SRC_MAC = bytes.fromhex("020000000002"), bytes.fromhex("020000000001")


def udp4(src: str, dst: str = "198.51.100.1", sport: int = 40000, dport: int = 53) -> bytes:
    """A 60-byte Ethernet frame (64 on the wire with the FCS): IPv4/UDP, 18 bytes of payload,
    so the IP packet fills the frame and there is no padding."""
    payload = bytes(18)
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0,
                     socket.inet_aton(src), socket.inet_aton(dst))
    return DST_MAC + SRC_MAC + b"\x08\x00" + ip + udp


def tcp4(src: str, dst: str, sport: int, dport: int, flags: int = 0x10) -> bytes:
    """A 60-byte IPv4/TCP frame (ACK by default, 6 bytes of payload)."""
    payload = bytes(6)
    tcp = struct.pack("!HHIIBBHHH", sport, dport, 1, 1, 5 << 4, flags, 65535, 0, 0) + payload
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 1, 0x4000, 64, 6, 0,
                     socket.inet_aton(src), socket.inet_aton(dst))
    return DST_MAC + SRC_MAC + b"\x08\x00" + ip + tcp


def udp6(src: str, dst: str = "2001:db8::1", sport: int = 40000, dport: int = 53) -> bytes:
    """A 64-byte IPv6/UDP frame (2 bytes of payload; the smallest UDP/IPv6 frame is 62)."""
    payload = bytes(2)
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    ip = struct.pack("!IHBB", 6 << 28, len(udp), 17, 64) + socket.inet_pton(
        socket.AF_INET6, src) + socket.inet_pton(socket.AF_INET6, dst)
    return DST_MAC + SRC_MAC + b"\x86\xdd" + ip + udp


# -- prefix sets --------------------------------------------------------------------------------
#
# A prefix is one int, (network << 8) | length: hashable, small, and sorts by network.

# First octets never generated: reserved or special ranges, and the ones the benchmark uses
# for its own addresses (198.18.0.0/15 is the benchmarking range, RFC 2544) and for the /8 and
# single-add probes of the load phase.
SKIPPED_FIRST_OCTETS = frozenset({0, 10, 100, 127, 169, 172, 192, 198, 203})
V4_FIRST_OCTETS = tuple(o for o in range(1, 224) if o not in SKIPPED_FIRST_OCTETS)

# (cumulative probability, lengths): /32 50%, /24 25%, /25-31 5%, /20-23 15%, /16-19 5% less
# "a few" /8-15 (4 in a million: about 8 in a 2M set).
V4_MIX = ((0.50, (32, 32)), (0.75, (24, 24)), (0.80, (25, 31)), (0.95, (20, 23)),
          (1 - 4e-6, (16, 19)), (1.0, (8, 15)))
V4_MIX_TEXT = "/32 50%, /24 25%, /25-31 5%, /20-23 15%, /16-19 5%, /8-15 4 per million"
V6_MIX = ((0.10, 128), (0.50, 48), (0.70, 56), (1.0, 64))
V6_MIX_TEXT = "/128 10%, /48 40%, /56 20%, /64 30%, in 2000::/3"


def v4_prefixes(n: int, seed: int) -> list[int]:
    """n distinct random IPv4 prefixes of the mix above; every leading slice has the mix."""
    rng = random.Random(seed)
    rand, bits, randint = rng.random, rng.getrandbits, rng.randint
    firsts, nfirst = V4_FIRST_OCTETS, len(V4_FIRST_OCTETS)
    out: list[int] = []
    seen: set[int] = set()
    while len(out) < n:
        r = rand()
        for cum, (lo, hi) in V4_MIX:
            if r < cum:
                length = lo if lo == hi else randint(lo, hi)
                break
        addr = (firsts[bits(16) % nfirst] << 24) | bits(24)
        net = addr >> (32 - length) << (32 - length)
        p = (net << 8) | length
        if p not in seen:
            seen.add(p)
            out.append(p)
    return out


def v4_exact(n: int, seed: int) -> list[int]:
    """n distinct random host addresses, as /32 prefixes."""
    rng = random.Random(seed)
    out, seen = [], set()
    while len(out) < n:
        addr = (V4_FIRST_OCTETS[rng.getrandbits(16) % len(V4_FIRST_OCTETS)] << 24) | \
            rng.getrandbits(24)
        if addr not in seen:
            seen.add(addr)
            out.append((addr << 8) | 32)
    return out


def v6_prefixes(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    out, seen = [], set()
    while len(out) < n:
        r = rng.random()
        length = next(ln for cum, ln in V6_MIX if r < cum)
        addr = (0x2000 << 112) | rng.getrandbits(125)
        net = addr >> (128 - length) << (128 - length)
        p = (net << 8) | length
        if p not in seen:
            seen.add(p)
            out.append(p)
    return out


def ip4(addr: int) -> str:
    return socket.inet_ntoa(addr.to_bytes(4, "big"))


def ip6(addr: int) -> str:
    return socket.inet_ntop(socket.AF_INET6, addr.to_bytes(16, "big"))


def v4_text(prefixes: Iterable[int]) -> str:
    """A blocklist: one prefix a line (README, POST /api/v1/rules/bulk, text/plain)."""
    ntoa, pack = socket.inet_ntoa, struct.Struct(">I").pack
    return "".join(f"{ntoa(pack(p >> 8))}/{p & 0xff}\n" for p in prefixes)


def v6_text(prefixes: Iterable[int]) -> str:
    return "".join(f"{ip6(p >> 8)}/{p & 0xff}\n" for p in prefixes)


class PrefixIndex:
    """Which prefixes of a set cover an address: one set of networks per length."""

    def __init__(self, prefixes: Iterable[int], bits: int) -> None:
        self.bits = bits
        self.by_len: dict[int, set[int]] = {}
        for p in prefixes:
            self.by_len.setdefault(p & 0xff, set()).add(p >> 8)
        self.lengths = sorted(self.by_len, reverse=True)
        # /24s (IPv4) that hold a host rule: what xdpfw's hostless bitmap is about.
        self.host_24s = {h >> 8 for h in self.by_len.get(32, ())} if bits == 32 else set()

    def longest(self, addr: int) -> int | None:
        """Length of the longest prefix covering addr, None when none does."""
        b = self.bits
        for length in self.lengths:
            if (addr >> (b - length) << (b - length)) in self.by_len[length]:
                return length
        return None


@dataclass(frozen=True)
class Probe:
    name: str
    addr: str
    why: str


def v4_probes(prefixes: Sequence[int], seed: int) -> list[Probe]:
    """The four sources of the per-packet table: a /32 hit, a /24 hit, a miss, and a miss in a
    /24 that holds a host rule (the one miss that pays for the host hash as well)."""
    idx = PrefixIndex(prefixes, 32)
    rng = random.Random(seed)
    out: list[Probe] = []
    hosts = [p >> 8 for p in prefixes if p & 0xff == 32]
    if hosts:
        out.append(Probe("/32 hit", ip4(hosts[0]), "a /32 rule: the host hash"))
    out += _v4_24_hit(prefixes, idx, rng)
    for _ in range(1_000_000):
        a = (V4_FIRST_OCTETS[rng.getrandbits(16) % len(V4_FIRST_OCTETS)] << 24) | \
            rng.getrandbits(24)
        if idx.longest(a) is None and (a >> 8) not in idx.host_24s:
            out.append(Probe("miss", ip4(a), "random, no prefix covers it, its /24 holds no "
                             "host rule"))
            break
    for h in rng.sample(hosts, min(len(hosts), 2000)):
        a = (h & ~0xff) | rng.getrandbits(8)
        if idx.longest(a) is None:
            out.append(Probe("miss in host /24", ip4(a), f"no prefix covers it; its /24 holds "
                             f"the host rule {ip4(h)}"))
            break
    return out


def _v4_24_hit(prefixes: Sequence[int], idx: PrefixIndex, rng: random.Random) -> list[Probe]:
    for p in prefixes:
        net, length = p >> 8, p & 0xff
        if length != 24 or (net >> 8) in idx.host_24s:
            continue
        for _ in range(16):
            a = net | rng.getrandbits(8)
            if idx.longest(a) == 24:
                return [Probe("/24 hit", ip4(a), f"in {ip4(net)}/24, its longest match, a "
                              "/24 with no host rule")]
    return []


def v6_probes(prefixes: Sequence[int], seed: int) -> list[Probe]:
    idx = PrefixIndex(prefixes, 128)
    rng = random.Random(seed)
    out = []
    host = next(p >> 8 for p in prefixes if p & 0xff == 128)
    out.append(Probe("/128 hit", ip6(host), "a /128 rule"))
    for p in prefixes:
        net, length = p >> 8, p & 0xff
        if length == 64:
            a = net | rng.getrandbits(64)
            if idx.longest(a) == 64:
                out.append(Probe("/64 hit", ip6(a), f"in {ip6(net)}/64, its longest match"))
                break
    while True:
        a = (0x2000 << 112) | rng.getrandbits(125)
        if idx.longest(a) is None:
            out.append(Probe("miss", ip6(a), "random in 2000::/3, no prefix covers it"))
            break
    return out


def v4_lpm_keys(prefixes: Sequence[int]) -> bytes:
    """Keys of an LPM trie with struct { u32 prefixlen; u8 addr[4]; } (host order length)."""
    pack = struct.Struct("<I4s").pack
    return b"".join(pack(p & 0xff, (p >> 8).to_bytes(4, "big")) for p in prefixes)


def v6_lpm_keys(prefixes: Sequence[int]) -> bytes:
    pack = struct.Struct("<I16s").pack
    return b"".join(pack(p & 0xff, (p >> 8).to_bytes(16, "big")) for p in prefixes)


# -- results: JSON lines, written as they come -------------------------------------------------


class Recorder:
    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict) -> None:
        line = json.dumps(record, sort_keys=True, default=_jsonable)
        with self.path.open("a") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())


def _jsonable(o):
    if isinstance(o, Stat):
        return o.json()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"cannot write {type(o).__name__} as JSON")


def read_records(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile."""
    s = sorted(values)
    return s[max(0, math.ceil(len(s) * q / 100) - 1)] if s else float("nan")
