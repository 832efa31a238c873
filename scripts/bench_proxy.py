#!/usr/bin/env python3
"""Benchmark the TCP proxy: bulk transfer and request/response, through the sockhash splice,
through the user-space relay, and straight to the backend (routed by the appliance namespace),
all in the same run, interleaved; print a markdown section ("## Socket proxy") to stdout.

Workloads:
- bulk: iperf3, one stream client -> backend, 128 KiB writes (iperf3's default);
- rr: scripts/bench_progs/tcp_rr.c, 100 connections each keeping one 1 KiB request
  outstanding and waiting for its 1 KiB echo (netperf's TCP_RR pattern), compiled here with cc.

Builds its own client/appliance/backend namespaces (10.81.x, removed at the end).

CPU is counted by a tracer on raw tracepoints (no kprobes or perf needed here):
- tasks: exact on-CPU time (sched_switch) of the tasks doing the work: client, server, the
  proxy process, every kworker (the psock backlog worker that transmits spliced bytes is one)
  and ksoftirqd. The kernel here has no IRQ time accounting, so softirq work (the TCP/IP
  stack over veth) is inside the time of the task it interrupted, which for veth is almost
  always the task that sent the packet: one of these. Blind to other users' processes.
- machine: busy time from /proc/stat, which also counts whatever else runs on a shared box.
It also counts, per veth, the skbs and bytes transmitted (net_dev_start_xmit): data skbs and
ACKs each way, the packets a proxy makes per GB. And the psock backlog worker's runs and its
one-jiffy re-arms (full send buffer).

    sudo .venv/bin/python scripts/bench_proxy.py [--seconds 5] [--repeat 3] [--json FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes as ct
import functools
import gzip
import json
import multiprocessing as mp
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from xdpfw import netns as nsutil  # noqa: E402
from xdpfw.proxy.loader import SPLICE_SNDBUF  # noqa: E402

CLI_IP, APP_CLI_IP, APP_BE_IP, BE_IP = "10.81.1.2", "10.81.1.1", "10.81.2.1", "10.81.2.2"
PORT = 5201
RR_CONNS, RR_SIZE = 100, 1024
CTX = mp.get_context("fork")
USER_HZ = os.sysconf("SC_CLK_TCK")
TCP_RR_SOURCE = ROOT / "scripts" / "bench_progs" / "tcp_rr.c"

# veth names, one per direction of each link, so that every transmit is attributed:
# client ns "c-app" -> appliance "a-cli"; appliance "a-be" -> backend ns "b-app".
VETHS = {"c-app": "client -> appliance", "a-cli": "appliance -> client",
         "a-be": "appliance -> backend", "b-app": "backend -> appliance"}


@dataclass(frozen=True)
class Route:
    """One way from the client to the backend; ProxyEngine options for the proxied ones."""

    key: str
    label: str
    engine: dict[str, Any] | None  # None: direct, no proxy


ROUTES = [
    Route("direct", "direct (routed)", None),
    Route("sockhash", "sockhash (strparser)", {"mode": "sockhash"}),
    Route("relay", "user-space relay (asyncio)", {"mode": "userspace"}),
]
WORKLOADS = ("bulk", "rr")

# Instrument of this benchmark, not part of the data plane. Offsets into kernel structs come
# from the running kernel's BTF (btf_offset), not from headers: the headers BCC compiles
# against here are another kernel's (6.1 vs 6.18), and struct sk_buff and net_device differ.
PROBE = r"""
#include <linux/workqueue.h>
#include <linux/timer.h>

struct taskstat { char comm[16]; u64 ns; u32 tgid, pad; };
struct devstat { char name[16]; u64 skbs, bytes; };
BPF_HASH(tasks, u32, struct taskstat, 16384);   /* by thread id */
BPF_HASH(devs, u64, struct devstat, 256);       /* by struct net_device address */
BPF_PERCPU_ARRAY(oncpu, u64, 1);                /* when this CPU's current task went on */
BPF_PERCPU_ARRAY(sirq_t0, u64, 1);
BPF_ARRAY(sirq_ns, u64, 10);                    /* softirq time per vector */
BPF_ARRAY(backlog, u64, 3);                     /* runs, ns running, one-jiffy re-arms */
BPF_HASH(started, u64, u64, 4096);

static __always_inline void add(void *map_lookup_result, u64 d)
{
    if (map_lookup_result)
        __sync_fetch_and_add((u64 *)map_lookup_result, d);
}

/* Fires before the switch: current is still the task going off the CPU. */
RAW_TRACEPOINT_PROBE(sched_switch)
{
    int z = 0;
    u64 now = bpf_ktime_get_ns(), *t0 = oncpu.lookup(&z);
    if (!t0)
        return 0;
    if (*t0) {
        u64 id = bpf_get_current_pid_tgid();
        u32 tid = id;
        struct taskstat zero = {}, *t = tasks.lookup_or_try_init(&tid, &zero);
        if (t) {
            bpf_get_current_comm(&t->comm, sizeof(t->comm));
            t->tgid = id >> 32;
            __sync_fetch_and_add(&t->ns, now - *t0);
        }
    }
    *t0 = now;
    return 0;
}

RAW_TRACEPOINT_PROBE(softirq_entry)
{
    int z = 0;
    u64 *t = sirq_t0.lookup(&z);
    if (t)
        *t = bpf_ktime_get_ns();
    return 0;
}

RAW_TRACEPOINT_PROBE(softirq_exit)
{
    int z = 0, vec = ctx->args[0];
    u64 *t = sirq_t0.lookup(&z);
    if (!t || !*t || vec < 0 || vec >= 10)
        return 0;
    add(sirq_ns.lookup(&vec), bpf_ktime_get_ns() - *t);
    *t = 0;
    return 0;
}

RAW_TRACEPOINT_PROBE(net_dev_start_xmit)
{
    char *skb = (char *)ctx->args[0], *dev = (char *)ctx->args[1];
    u64 key = (u64)dev;
    u32 len = 0;
    struct devstat zero = {}, *d = devs.lookup_or_try_init(&key, &zero);
    if (!d)
        return 0;
    if (!d->name[0])
        bpf_probe_read_kernel(&d->name, sizeof(d->name), dev + OFF_NET_DEVICE_NAME);
    bpf_probe_read_kernel(&len, sizeof(len), skb + OFF_SK_BUFF_LEN);
    __sync_fetch_and_add(&d->skbs, 1);
    __sync_fetch_and_add(&d->bytes, len);
    return 0;
}

RAW_TRACEPOINT_PROBE(workqueue_execute_start)
{
    struct work_struct *w = (void *)ctx->args[0];
    void *fn = 0;
    bpf_probe_read_kernel(&fn, sizeof(fn), &w->func);
    if ((u64)fn != BACKLOG_FN)
        return 0;
    u64 key = (u64)w, now = bpf_ktime_get_ns();
    started.update(&key, &now);
    return 0;
}

RAW_TRACEPOINT_PROBE(workqueue_execute_end)
{
    int runs = 0, ns = 1;
    if (ctx->args[1] != BACKLOG_FN)
        return 0;
    u64 key = ctx->args[0], *t0 = started.lookup(&key);
    if (!t0)
        return 0;
    add(backlog.lookup(&runs), 1);
    add(backlog.lookup(&ns), bpf_ktime_get_ns() - *t0);
    started.delete(&key);
    return 0;
}

RAW_TRACEPOINT_PROBE(timer_start)
{
    struct timer_list *timer = (void *)ctx->args[0];
    void *fn = 0, *work_fn = 0;
    int rearms = 2;
    bpf_probe_read_kernel(&fn, sizeof(fn), &timer->function);
    if ((u64)fn != DELAYED_WORK_TIMER_FN)
        return 0;
    struct delayed_work *dw = (void *)((char *)timer - offsetof(struct delayed_work, timer));
    bpf_probe_read_kernel(&work_fn, sizeof(work_fn), &dw->work.func);
    if ((u64)work_fn == BACKLOG_FN)
        add(backlog.lookup(&rearms), 1);
    return 0;
}
"""
SOFTIRQS = ("HI", "TIMER", "NET_TX", "NET_RX", "BLOCK", "IRQ_POLL", "TASKLET", "SCHED",
            "HRTIMER", "RCU")


def kallsyms(*names: str) -> dict[str, int]:
    found: dict[str, int] = {}
    with open("/proc/kallsyms") as f:
        for line in f:
            addr, _, name = line.split()[:3]
            if name in names and name not in found:
                found[name] = int(addr, 16)
    missing = set(names) - set(found)
    if missing or not any(found.values()):
        raise RuntimeError(f"kallsyms: {missing or 'addresses hidden (kptr_restrict)'}")
    return found


@functools.cache
def _btf_types() -> dict[int, dict[str, Any]]:
    out = subprocess.run(["bpftool", "btf", "dump", "file", "/sys/kernel/btf/vmlinux",
                          "format", "raw"], capture_output=True, text=True, check=True).stdout
    types: dict[int, dict[str, Any]] = {}
    cur: dict[str, Any] | None = None
    for line in out.splitlines():
        m = re.match(r"\[(\d+)\] (\w+) '([^']*)'(.*)", line)
        if m:
            cur = {"kind": m[2], "name": m[3], "rest": m[4], "members": []}
            types[int(m[1])] = cur
        elif cur is not None and (m := re.match(
                r"\s+'([^']*)' type_id=(\d+)(?: bits_offset=(\d+))?", line)):
            cur["members"].append((m[1], int(m[2]), int(m[3] or 0)))
    return types


def btf_offset(struct: str, member: str) -> int:
    """Byte offset of struct.member in the running kernel (anonymous unions walked)."""
    types = _btf_types()

    def resolve(tid: int) -> int:
        while types[tid]["kind"] in ("TYPEDEF", "CONST", "VOLATILE", "TYPE_TAG", "RESTRICT"):
            tid = int(re.search(r"type_id=(\d+)", types[tid]["rest"])[1])
        return tid

    def find(tid: int) -> int | None:
        for name, mtype, bits in types[tid]["members"]:
            if name == member:
                return bits
            if name == "(anon)" and types[resolve(mtype)]["kind"] in ("STRUCT", "UNION"):
                sub = find(resolve(mtype))
                if sub is not None:
                    return bits + sub
        return None

    for tid, t in types.items():
        if t["kind"] == "STRUCT" and t["name"] == struct and t["members"]:
            bits = find(tid)
            if bits is not None and bits % 8 == 0:
                return bits // 8
    raise LookupError(f"BTF: no member {member} in struct {struct}")


@dataclass
class Snapshot:
    tasks: dict[int, tuple[str, int, int]]  # tid -> (comm, tgid, ns on CPU)
    devs: dict[str, tuple[int, int]]  # veth name -> (skbs, bytes)
    softirq_ns: list[int]
    backlog: list[int]  # runs, ns, re-arms
    busy_s: float  # /proc/stat
    at: float


class Tracer:
    def __init__(self) -> None:
        from bcc import BPF

        sym = kallsyms("sk_psock_backlog", "delayed_work_timer_fn")
        self.bpf = BPF(text=PROBE.encode(), cflags=[
            f"-DBACKLOG_FN={sym['sk_psock_backlog']}ULL",
            f"-DDELAYED_WORK_TIMER_FN={sym['delayed_work_timer_fn']}ULL",
            f"-DOFF_NET_DEVICE_NAME={btf_offset('net_device', 'name')}",
            f"-DOFF_SK_BUFF_LEN={btf_offset('sk_buff', 'len')}",
        ])

    def snapshot(self) -> Snapshot:
        b = self.bpf
        tasks = {k.value: (v.comm.decode(errors="replace"), v.tgid, v.ns)
                 for k, v in b[b"tasks"].items()}
        devs: dict[str, tuple[int, int]] = {}
        for _, v in b[b"devs"].items():
            name = v.name.decode(errors="replace")
            if name in VETHS:
                devs[name] = (v.skbs, v.bytes)
        sirq = [b[b"sirq_ns"][ct.c_int(i)].value for i in range(10)]
        backlog = [b[b"backlog"][ct.c_int(i)].value for i in range(3)]
        return Snapshot(tasks, devs, sirq, backlog, busy_seconds(), time.monotonic())

    def close(self) -> None:
        self.bpf.cleanup()


def busy_seconds() -> float:
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / USER_HZ


@dataclass
class Result:
    route: str
    workload: str
    seconds: float
    rate: float  # bulk: Gbit/s received; rr: transactions/s
    gbytes: float  # payload bytes moved (rr: both ways)
    transactions: int
    cpu: dict[str, float]  # seconds on CPU: client, server, proxy, kworker, ksoftirqd
    machine_s: float
    softirq_s: dict[str, float]
    veth: dict[str, tuple[int, int]]  # skbs, bytes per veth
    backlog_runs: int
    backlog_s: float
    rearms: int
    latency_us: dict[str, float] = field(default_factory=dict)
    sent_gbytes: float = 0.0  # bulk: what the client wrote (the rest is queued on the way)

    @property
    def tasks_s(self) -> float:
        return sum(self.cpu.values())

    @property
    def tasks_per_gb(self) -> float:
        return self.tasks_s / self.gbytes

    @property
    def machine_per_gb(self) -> float:
        return self.machine_s / self.gbytes

    @property
    def tx_per_cpu_s(self) -> float:
        return self.transactions / self.tasks_s

    @property
    def tx_per_machine_s(self) -> float:
        return self.transactions / self.machine_s


def account(a: Snapshot, b: Snapshot, pids: dict[int, str]) -> dict[str, float]:
    """On-CPU seconds between two snapshots, grouped: pids maps tgid -> group."""
    groups = dict.fromkeys(("client", "server", "proxy", "kworker", "ksoftirqd"), 0.0)
    for tid, (comm, tgid, ns) in b.tasks.items():
        d = (ns - a.tasks.get(tid, ("", 0, 0))[2]) / 1e9
        if tid == 0 or d <= 0:
            continue
        group = pids.get(tgid) or next(
            (g for g in ("kworker", "ksoftirqd") if comm.startswith(g)), None)
        if group:
            groups[group] += d
    return groups


def _engine_child(ns: str, options: dict[str, Any], chan) -> None:
    from pyroute2 import netns as pnetns

    from xdpfw.proxy.engine import ProxyEngine

    pnetns.setns(ns)
    eng = ProxyEngine(APP_CLI_IP, PORT, lambda _a: (BE_IP, PORT), 1, **options)
    eng.start()
    chan.send(eng.mode)
    chan.recv()  # any message: stop
    eng.stop()
    chan.send("stopped")


@contextlib.contextmanager
def proxy(ns: str, options: dict[str, Any]) -> Iterator[int]:
    parent, child = CTX.Pipe()
    p = CTX.Process(target=_engine_child, args=(ns, options, child), daemon=True)
    p.start()
    if not parent.poll(60):
        p.terminate()
        raise RuntimeError(f"proxy {options} did not start")
    got = parent.recv()
    if got != options["mode"]:
        p.terminate()
        raise RuntimeError(f"asked for a {options['mode']} proxy, engine runs {got}")
    try:
        yield p.pid
    finally:
        parent.send("stop")
        parent.poll(30)
        p.join(10)


def wait_listening(ns: str) -> None:
    if not nsutil.wait_until(lambda: bool(nsutil.run_in(
            ns, ["ss", "-Hltn", f"sport = :{PORT}"]).stdout.strip()), timeout=10):
        raise RuntimeError(f"nothing listens on port {PORT} in {ns}")


def run_bulk(cli: str, be: str, target: str, seconds: int) -> tuple[dict, dict[int, str]]:
    srv = subprocess.Popen(["ip", "netns", "exec", be, "iperf3", "-s", "-1", "-p", str(PORT)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_listening(be)  # iperf3 block-buffers its banner on a pipe
        c = subprocess.Popen(["ip", "netns", "exec", cli, "iperf3", "-c", target, "-p",
                              str(PORT), "-t", str(seconds), "-J"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        out, err = c.communicate(timeout=seconds + 30)
        if c.returncode != 0:
            raise RuntimeError(f"iperf3 -c {target} failed: {out[-2000:]} {err}")
    finally:
        with contextlib.suppress(subprocess.TimeoutExpired):
            srv.wait(10)
        if srv.poll() is None:
            srv.kill()
            srv.wait()
    end = json.loads(out)["end"]
    received = end["sum_received"]
    return ({"rate": received["bits_per_second"] / 1e9, "bytes": received["bytes"],
             "sent": end["sum_sent"]["bytes"], "transactions": 0},
            {srv.pid: "server", c.pid: "client"})


def run_rr(tcp_rr: Path, cli: str, be: str, target: str,
           seconds: int) -> tuple[dict, dict[int, str]]:
    srv = subprocess.Popen(["ip", "netns", "exec", be, str(tcp_rr), "server", str(PORT),
                            str(seconds + 20)], stdout=subprocess.PIPE, text=True)
    try:
        if srv.stdout.readline().strip() != "listening":
            raise RuntimeError(f"tcp_rr server in {be} did not start")
        c = subprocess.Popen(["ip", "netns", "exec", cli, str(tcp_rr), "client", target,
                              str(PORT), str(RR_CONNS), str(RR_SIZE), str(seconds)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        out, err = c.communicate(timeout=seconds + 30)
        if c.returncode != 0:
            raise RuntimeError(f"tcp_rr client -> {target} failed: {out} {err}")
    finally:
        srv.kill()
        srv.wait()
    r = json.loads(out)
    return ({"rate": r["transactions"] / r["seconds"], "transactions": r["transactions"],
             "bytes": 2 * RR_SIZE * r["transactions"],
             "latency_us": {k: r[f"{k}_us"] for k in ("p50", "p99", "p999")}},
            {srv.pid: "server", c.pid: "client"})


def measure(route: Route, workload: str, cli: str, be: str, target: str, seconds: int,
            proxy_pid: int | None, tracer: Tracer, tcp_rr: Path) -> Result:
    s0 = tracer.snapshot()
    if workload == "bulk":
        got, pids = run_bulk(cli, be, target, seconds)
    else:
        got, pids = run_rr(tcp_rr, cli, be, target, seconds)
    s1 = tracer.snapshot()
    if proxy_pid:
        pids[proxy_pid] = "proxy"
    runs, run_ns, rearms = (y - x for x, y in zip(s0.backlog, s1.backlog, strict=True))
    return Result(
        route.key, workload, s1.at - s0.at, got["rate"], got["bytes"] / 1e9,
        got["transactions"], account(s0, s1, pids), s1.busy_s - s0.busy_s,
        {SOFTIRQS[i]: (y - x) / 1e9 for i, (x, y) in
         enumerate(zip(s0.softirq_ns, s1.softirq_ns, strict=True)) if y - x > 1e7},
        {n: tuple(y - x for x, y in zip(s0.devs.get(n, (0, 0)), v, strict=True))
         for n, v in s1.devs.items()},
        int(runs), run_ns / 1e9, int(rearms), got.get("latency_us", {}),
        got.get("sent", 0) / 1e9)


def build_topology() -> tuple[str, str, str]:
    tag = uuid.uuid4().hex[:6]
    cli, app, be = (f"xdpfw-bench-{r}-{tag}" for r in ("cli", "app", "be"))
    for ns in (cli, app, be):
        nsutil.create_netns(ns)
    A = nsutil.Addr
    nsutil.veth_pair(app, "a-cli", cli, "c-app", [A(APP_CLI_IP, 24)], [A(CLI_IP, 24)])
    nsutil.veth_pair(app, "a-be", be, "b-app", [A(APP_BE_IP, 24)], [A(BE_IP, 24)])
    # The direct path: the appliance namespace routes, nothing terminates TCP there.
    for ns, argv in ((app, ["sysctl", "-qw", "net.ipv4.ip_forward=1"]),
                     (cli, ["ip", "route", "add", "10.81.2.0/24", "via", APP_CLI_IP]),
                     (be, ["ip", "route", "add", "10.81.1.0/24", "via", APP_BE_IP])):
        r = nsutil.run_in(ns, argv)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} in {ns}: {r.stderr}")
    return cli, app, be


def build_tcp_rr(into: Path) -> Path:
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        raise RuntimeError("the rr workload needs a C compiler (cc) for "
                           f"{TCP_RR_SOURCE.relative_to(ROOT)}")
    out = into / "tcp_rr"
    r = subprocess.run([cc, "-O2", "-Wall", "-o", str(out), str(TCP_RR_SOURCE)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"cannot compile {TCP_RR_SOURCE.name}: {r.stderr}")
    return out


def sysctl(ns: str, name: str) -> str:
    return nsutil.run_in(ns, ["sysctl", "-n", name]).stdout.strip().replace("\t", " ")


def load_average() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def cpu_model() -> str:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.machine()


def git_rev() -> str:
    r = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True,
                       text=True, cwd=ROOT)
    return r.stdout.strip() or "unknown"


def hz() -> int:
    """CONFIG_HZ (the kernel tick, not USER_HZ) from the running kernel's config; 0: unknown."""
    try:
        with gzip.open("/proc/config.gz", "rt") as f:
            for line in f:
                if line.startswith("CONFIG_HZ="):
                    return int(line.split("=")[1])
    except OSError:
        pass
    return 0


def spread(values: list[float], fmt: str = "{:.2f}") -> str:
    """median (min-max)"""
    med = statistics.median(values)
    if len(values) == 1:
        return fmt.format(med)
    return f"{fmt.format(med)} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def per_gb_packets(r: Result, veth: str) -> tuple[float, float]:
    """(skbs per GB of payload, mean skb bytes) transmitted on one veth."""
    skbs, nbytes = r.veth.get(veth, (0, 0))
    return skbs / r.gbytes, (nbytes / skbs if skbs else 0.0)


def markdown(results: list[Result], routes: list[Route], args: argparse.Namespace,
             env: dict[str, str]) -> str:
    def rs(route: str, workload: str) -> list[Result]:
        return [r for r in results if r.route == route and r.workload == workload]

    def med(route: str, workload: str, attr: str) -> float:
        return statistics.median(getattr(r, attr) for r in rs(route, workload))

    keys = [r.key for r in routes]
    lines = [
        "## Socket proxy",
        "",
        f"Produced by `scripts/bench_proxy.py --seconds {args.seconds} --repeat {args.repeat}` "
        f"on {env['date']} (code {env['rev']}).",
        "",
        f"- machine: {os.cpu_count()} x {env['cpu']}, shared with other engineers; kernel "
        f"{platform.release()}, HZ {env['hz']}; congestion control {env['cc']}",
        f"- load average at start: {env['load0']}; at end: {env['load1']}",
        f"- namespaces' tcp_rmem {env['tcp_rmem']}, tcp_wmem {env['tcp_wmem']}; veths with "
        "their defaults (TSO/GSO on, GRO off); spliced sockets get SO_SNDBUF "
        f"{SPLICE_SNDBUF >> 20} MiB (the kernel doubles it)",
        "- client | appliance | backend namespaces over two veth pairs; the direct path is "
        "routed by the appliance namespace",
        f"- bulk: iperf3, one stream, client -> backend, 128 KiB writes. rr: {RR_CONNS} "
        f"connections, one {RR_SIZE}-byte request outstanding on each, echoed back "
        "(scripts/bench_progs/tcp_rr.c, TCP_NODELAY at both ends)",
        f"- every route and workload ran {args.repeat} times, interleaved: median (min-max). "
        "CPU 'tasks' is the exact on-CPU time of client, server, proxy process, kworkers and "
        "ksoftirqd (sched_switch; softirq work runs inside them); 'machine' is /proc/stat busy "
        "time and includes the other users.",
        "",
        "### Bulk (one iperf3 stream)",
        "",
        "| route | Gbit/s | tasks CPU s/GB | machine CPU s/GB | proxy process s/GB "
        "| kworkers s/GB | client data skbs/GB (mean KB) | ACKs to client /GB "
        "| backlog worker % of a CPU | client sent / backend received |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for route in routes:
        b = rs(route.key, "bulk")
        if not b:
            continue
        skbs = statistics.median(per_gb_packets(r, "c-app")[0] for r in b)
        size = statistics.median(per_gb_packets(r, "c-app")[1] for r in b)
        acks = statistics.median(per_gb_packets(r, "a-cli")[0] for r in b)
        own = ("-" if route.engine is None
               else f"{statistics.median(r.cpu['proxy'] / r.gbytes for r in b):.3f}")
        lines.append(
            f"| {route.label} | {spread([r.rate for r in b])} "
            f"| {spread([r.tasks_per_gb for r in b])} | {spread([r.machine_per_gb for r in b])} "
            f"| {own} | {statistics.median(r.cpu['kworker'] / r.gbytes for r in b):.3f} "
            f"| {skbs:,.0f} ({size / 1000:.1f}) | {acks:,.0f} "
            f"| {statistics.median(100 * r.backlog_s / r.seconds for r in b):.0f} "
            f"| {spread([r.sent_gbytes / r.gbytes for r in b])} |")
    lines += [
        "",
        f"### Request/response ({RR_CONNS} connections, {RR_SIZE} B each way)",
        "",
        "| route | transactions/s | per tasks CPU-second | per machine CPU-second "
        "| proxy process CPU-s | kworkers CPU-s | p50 / p99 latency (us) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for route in routes:
        q = rs(route.key, "rr")
        if not q:
            continue
        lat = (f"{statistics.median(r.latency_us['p50'] for r in q):.0f} / "
               f"{statistics.median(r.latency_us['p99'] for r in q):.0f}")
        own = ("-" if route.engine is None
               else f"{statistics.median(r.cpu['proxy'] for r in q):.2f}")
        lines.append(
            f"| {route.label} | {spread([r.rate for r in q], '{:,.0f}')} "
            f"| {spread([r.tx_per_cpu_s for r in q], '{:,.0f}')} "
            f"| {spread([r.tx_per_machine_s for r in q], '{:,.0f}')} | {own} "
            f"| {statistics.median(r.cpu['kworker'] for r in q):.2f} | {lat} |")
    if {"sockhash", "relay"} <= set(keys):
        have_bulk = rs("sockhash", "bulk") and rs("relay", "bulk")
        have_rr = rs("sockhash", "rr") and rs("relay", "rr")
        lines += ["", "Against the user-space relay (medians):", ""]
        if have_bulk:
            cpu = med("sockhash", "bulk", "tasks_per_gb") / med("relay", "bulk", "tasks_per_gb")
            speed = med("sockhash", "bulk", "rate") / med("relay", "bulk", "rate")
            lines.append(f"- bulk, sockhash CPU-s/GB / relay CPU-s/GB: **{cpu:.2f}** "
                         f"(target <= 0.80: {'met' if cpu <= 0.8 else '**not met**'}); "
                         f"throughput {speed:.2f}x")
        if have_rr:
            tx = med("sockhash", "rr", "rate") / med("relay", "rr", "rate")
            eff = med("sockhash", "rr", "tx_per_cpu_s") / med("relay", "rr", "tx_per_cpu_s")
            lines.append(f"- rr, sockhash transactions/s / relay: **{tx:.2f}x** (target >= 1.5x: "
                         f"{'met' if tx >= 1.5 else '**not met**'}); per tasks CPU-second "
                         f"{eff:.2f}x")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=int, default=5, help="length of each run")
    ap.add_argument("--repeat", type=int, default=3, help="runs per route and workload")
    ap.add_argument("--routes", default=",".join(r.key for r in ROUTES),
                    help=f"comma-separated, of {[r.key for r in ROUTES]}")
    ap.add_argument("--workloads", default=",".join(WORKLOADS), help="bulk, rr or both")
    ap.add_argument("--json", type=Path, help="also append every run as a JSON line here")
    args = ap.parse_args()
    routes = [r for r in ROUTES if r.key in args.routes.split(",")]
    workloads = [w for w in WORKLOADS if w in args.workloads.split(",")]
    if os.geteuid() != 0:
        print("needs root (namespaces, BPF)", file=sys.stderr)
        return 2
    # SIGTERM (e.g. from timeout) must still run the namespace clean-up below.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    env = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rev": git_rev(),
           "cpu": cpu_model(), "load0": load_average()}
    tmp = Path(tempfile.mkdtemp(prefix="bench-proxy-"))
    tcp_rr = build_tcp_rr(tmp) if "rr" in workloads else tmp / "unused"
    namespaces = build_topology()
    cli, app, be = namespaces
    env |= {"tcp_rmem": sysctl(app, "net.ipv4.tcp_rmem"),
            "tcp_wmem": sysctl(app, "net.ipv4.tcp_wmem"),
            "cc": sysctl(app, "net.ipv4.tcp_congestion_control")}
    tracer = Tracer()
    results: list[Result] = []
    try:
        for i in range(args.repeat):
            for workload in workloads:
                for route in routes:
                    if route.engine is None:
                        r = measure(route, workload, cli, be, BE_IP, args.seconds, None,
                                    tracer, tcp_rr)
                    else:
                        with proxy(app, route.engine) as pid:
                            r = measure(route, workload, cli, be, APP_CLI_IP, args.seconds,
                                        pid, tracer, tcp_rr)
                    results.append(r)
                    unit = "Gbit/s" if workload == "bulk" else "transactions/s"
                    extra = (f"{r.tasks_per_gb:.3f} CPU-s/GB" if workload == "bulk"
                             else f"{r.tx_per_cpu_s:,.0f} per CPU-s")
                    print(f"[{i + 1}/{args.repeat}] {workload} {route.key}: {r.rate:,.2f} "
                          f"{unit}, {extra}", file=sys.stderr)
                    if args.json:
                        with args.json.open("a") as f:
                            f.write(json.dumps(asdict(r) | {"rev": env["rev"]}) + "\n")
    finally:
        tracer.close()
        for ns in namespaces:
            nsutil.remove_netns(ns)
        shutil.rmtree(tmp, ignore_errors=True)
    env["load1"] = load_average()
    env["hz"] = str(hz())
    print(markdown(results, routes, args, env))
    return 0


if __name__ == "__main__":
    sys.exit(main())
