#!/usr/bin/env python3
"""Benchmark the TCP proxy: iperf3 through the sockhash splice (several configurations),
through the asyncio user-space relay, and straight to the backend (routed by the appliance
namespace), interleaved, and print a markdown section ("## Socket proxy") to stdout.

Builds its own client/appliance/backend namespaces (10.81.x, removed at the end).

CPU, two ways, per GB received:
- machine: whole-machine busy time from /proc/stat. Includes softirq time that no task is
  charged for, but also whatever else runs on a shared machine.
- tasks: CPU time of the tasks doing the work: both iperf3 processes, the proxy process, and
  the deltas of every kworker (the psock backlog worker that transmits spliced bytes is one)
  and ksoftirqd thread. Exact (sum_exec_runtime), and blind to other users' processes, but it
  misses softirq work that interrupted the idle task or somebody else's process.

The psock backlog worker is also traced (raw tracepoints, no kprobes needed): how long it
ran and how often it parked itself on a one-jiffy timer because the socket it sends on had a
full send buffer.

    sudo .venv/bin/python scripts/bench_proxy.py [--seconds 5] [--repeat 3]
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import multiprocessing as mp
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from xdpfw import netns as nsutil
from xdpfw.proxy.loader import SPLICE_SNDBUF

CLI_IP, APP_CLI_IP, APP_BE_IP, BE_IP = "10.81.1.2", "10.81.1.1", "10.81.2.1", "10.81.2.2"
PORT = 5201
CTX = mp.get_context("fork")
HZ_TICK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Route:
    """One way from the client to the backend; engine options for the proxied ones."""

    label: str
    engine: dict[str, Any] | None  # None: direct, no proxy


# Send buffer sizes are what the kernel uses: SO_SNDBUF(SPLICE_SNDBUF) gives twice that.
PATHS = [
    Route("direct (routed)", None),
    Route(f"sockhash, strparser, send buffer {SPLICE_SNDBUF >> 19} MiB (default)",
          {"mode": "sockhash", "attach": "stream"}),
    Route(f"sockhash, verdict-only, send buffer {SPLICE_SNDBUF >> 19} MiB",
          {"mode": "sockhash", "attach": "verdict"}),
    Route("sockhash, verdict-only, autotuned send buffer",
          {"mode": "sockhash", "attach": "verdict", "splice_sndbuf": None}),
    Route("sockhash, strparser, autotuned send buffer",
          {"mode": "sockhash", "attach": "stream", "splice_sndbuf": None}),
    Route("user-space relay (asyncio)", {"mode": "userspace"}),
]
DIRECT, SPLICED, RELAY = PATHS[0].label, PATHS[1].label, PATHS[-1].label

# Instrument of this benchmark, not part of the data plane: the psock backlog worker's runs
# (workqueue tracepoints, matched on the work function) and its one-jiffy re-arms (the
# delayed-work timer being started for it).
BACKLOG_PROBE = r"""
#include <linux/workqueue.h>
#include <linux/timer.h>
BPF_ARRAY(stats, u64, 3); /* runs, ns running, timer re-arms */
BPF_HASH(started, u64, u64, 4096);
static __always_inline void add(int i, u64 d)
{
    u64 *v = stats.lookup(&i);
    if (v)
        __sync_fetch_and_add(v, d);
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
    if (ctx->args[1] != BACKLOG_FN)
        return 0;
    u64 key = ctx->args[0], *t0 = started.lookup(&key);
    if (!t0)
        return 0;
    add(0, 1);
    add(1, bpf_ktime_get_ns() - *t0);
    started.delete(&key);
    return 0;
}
RAW_TRACEPOINT_PROBE(timer_start)
{
    struct timer_list *timer = (void *)ctx->args[0];
    void *fn = 0, *work_fn = 0;
    bpf_probe_read_kernel(&fn, sizeof(fn), &timer->function);
    if ((u64)fn != DELAYED_WORK_TIMER_FN)
        return 0;
    struct delayed_work *dw = (void *)((char *)timer - offsetof(struct delayed_work, timer));
    bpf_probe_read_kernel(&work_fn, sizeof(work_fn), &dw->work.func);
    if ((u64)work_fn == BACKLOG_FN)
        add(2, 1);
    return 0;
}
"""


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


class BacklogTracer:
    def __init__(self) -> None:
        from bcc import BPF

        sym = kallsyms("sk_psock_backlog", "delayed_work_timer_fn")
        self.bpf = BPF(text=BACKLOG_PROBE.encode(), cflags=[
            f"-DBACKLOG_FN={sym['sk_psock_backlog']}ULL",
            f"-DDELAYED_WORK_TIMER_FN={sym['delayed_work_timer_fn']}ULL",
        ])

    def read(self) -> tuple[int, float, int]:
        t = self.bpf[b"stats"]
        runs, ns, rearms = (t[t.Key(i)].value for i in range(3))
        return runs, ns / 1e9, rearms

    def close(self) -> None:
        self.bpf.cleanup()


@dataclass
class Result:
    path: str
    gbit_s: float
    gbytes: float
    machine_s: float
    tasks_s: float
    proxy_s: float | None
    backlog_runs: int
    backlog_s: float
    rearms: int
    seconds: float

    @property
    def machine_per_gb(self) -> float:
        return self.machine_s / self.gbytes

    @property
    def tasks_per_gb(self) -> float:
        return self.tasks_s / self.gbytes


def busy_seconds() -> float:
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / HZ_TICK


def proc_cpu_s(pid: int) -> float:
    """utime + stime of a process or thread (scaled by the kernel to its exact runtime)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / HZ_TICK


def kernel_threads_cpu() -> dict[int, float]:
    """CPU seconds of every kworker and ksoftirqd thread, by pid."""
    out: dict[int, float] = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/comm") as f:
                comm = f.read()
            if comm.startswith(("kworker", "ksoftirqd")):
                out[int(pid)] = proc_cpu_s(int(pid))
        except OSError:  # exited meanwhile
            continue
    return out


def _engine_child(ns: str, options: dict[str, Any], chan) -> None:
    from pyroute2 import netns as pnetns

    from xdpfw.proxy.engine import ProxyEngine

    pnetns.setns(ns)
    eng = ProxyEngine(APP_CLI_IP, PORT, lambda _a: (BE_IP, PORT), 1, **options)
    eng.start()
    chan.send(eng.mode)
    chan.recv()  # any message: stop
    c = eng.counters()
    eng.stop()
    chan.send((c.bytes_to_backend, c.bytes_to_client))


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


def children_cpu_s() -> float:
    """CPU seconds of reaped children (the kernel scales rusage to the exact runtime)."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def iperf(cli: str, be: str, target: str, seconds: int) -> tuple[float, float, float]:
    """One iperf3 run client->backend; returns (bits/s, bytes received, iperf3 CPU s).

    Both iperf3 processes are reaped here and nothing else runs meanwhile but `ss`, so the
    RUSAGE_CHILDREN delta is their CPU time."""
    cpu0 = children_cpu_s()
    srv = subprocess.Popen(["ip", "netns", "exec", be, "iperf3", "-s", "-1", "-p", str(PORT)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # iperf3 block-buffers its banner on a pipe: poll for the listening socket instead.
        listening = nsutil.wait_until(lambda: bool(nsutil.run_in(
            be, ["ss", "-Hltn", f"sport = :{PORT}"]).stdout.strip()), timeout=10)
        if not listening:
            raise RuntimeError(f"iperf3 server in {be} is not listening on {PORT}")
        run = nsutil.run_in(cli, ["iperf3", "-c", target, "-p", str(PORT), "-t", str(seconds),
                                  "-J"], timeout=seconds + 30)
        if run.returncode != 0:
            raise RuntimeError(f"iperf3 -c {target} failed: {run.stdout[-2000:]} {run.stderr}")
        end = json.loads(run.stdout)["end"]["sum_received"]
    finally:
        with contextlib.suppress(subprocess.TimeoutExpired):
            srv.wait(10)
        if srv.poll() is None:
            srv.kill()
            srv.wait()
    return end["bits_per_second"], end["bytes"], children_cpu_s() - cpu0


def measure(path: str, cli: str, be: str, target: str, seconds: int,
            proxy_pid: int | None, tracer: BacklogTracer) -> Result:
    proxy0 = proc_cpu_s(proxy_pid) if proxy_pid else 0.0
    kthreads0, trace0, busy0, t0 = kernel_threads_cpu(), tracer.read(), busy_seconds(), \
        time.monotonic()
    bps, nbytes, iperf_cpu = iperf(cli, be, target, seconds)
    busy1, trace1, kthreads1, t1 = busy_seconds(), tracer.read(), kernel_threads_cpu(), \
        time.monotonic()
    proxy_cpu = proc_cpu_s(proxy_pid) - proxy0 if proxy_pid else None
    kthreads = sum(v - kthreads0.get(pid, 0.0) for pid, v in kthreads1.items())
    runs, run_s, rearms = (b - a for a, b in zip(trace0, trace1, strict=True))
    return Result(path, bps / 1e9, nbytes / 1e9, busy1 - busy0,
                  iperf_cpu + (proxy_cpu or 0.0) + kthreads, proxy_cpu, int(runs), run_s,
                  int(rearms), t1 - t0)


def build_topology() -> tuple[str, str, str]:
    tag = uuid.uuid4().hex[:6]
    cli, app, be = (f"xdpfw-bench-{r}-{tag}" for r in ("cli", "app", "be"))
    for ns in (cli, app, be):
        nsutil.create_netns(ns)
    A = nsutil.Addr
    nsutil.veth_pair(app, "to-cli", cli, "to-app", [A(APP_CLI_IP, 24)], [A(CLI_IP, 24)])
    nsutil.veth_pair(app, "to-be", be, "to-app", [A(APP_BE_IP, 24)], [A(BE_IP, 24)])
    # The direct path: the appliance namespace routes, nothing terminates TCP there.
    for ns, argv in ((app, ["sysctl", "-qw", "net.ipv4.ip_forward=1"]),
                     (cli, ["ip", "route", "add", "10.81.2.0/24", "via", APP_CLI_IP]),
                     (be, ["ip", "route", "add", "10.81.1.0/24", "via", APP_BE_IP])):
        r = nsutil.run_in(ns, argv)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} in {ns}: {r.stderr}")
    return cli, app, be


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
                       text=True, cwd=Path(__file__).resolve().parent.parent)
    return r.stdout.strip() or "unknown"


def markdown(results: list[Result], args: argparse.Namespace, env: dict[str, str]) -> str:
    by_path = {p.label: [r for r in results if r.path == p.label] for p in PATHS}

    def med(label: str, attr: str) -> float:
        return statistics.median(getattr(r, attr) for r in by_path[label])

    lines = [
        "## Socket proxy",
        "",
        f"Produced by `scripts/bench_proxy.py --seconds {args.seconds} --repeat {args.repeat}` "
        f"on {env['date']} (code {env['rev']}).",
        "",
        f"- machine: {os.cpu_count()} x {env['cpu']}, shared with other engineers; kernel "
        f"{platform.release()}, HZ {env['hz']}",
        f"- load average at start: {env['load0']}; at end: {env['load1']}",
        f"- namespaces' tcp_rmem {env['tcp_rmem']}, tcp_wmem {env['tcp_wmem']}; veths with "
        "their defaults (TSO/GSO on, GRO off)",
        "- iperf3 3.x, one stream, client -> backend, 128 KiB writes (iperf3 default), across "
        "two veth pairs (client | appliance | backend namespaces); the direct path is routed "
        "by the appliance namespace",
        f"- every path ran {args.repeat} times, interleaved; the table gives the median "
        "(min-max). CPU columns are seconds per GB received (see the script's docstring: "
        "'machine' includes other users' load, 'tasks' counts only the tasks doing the work). "
        "Backlog: the psock worker that transmits spliced bytes, its share of one CPU and its "
        "one-jiffy re-arms per second (full send buffer).",
        "",
        "| path | Gbit/s | machine CPU s/GB | tasks CPU s/GB | proxy process s/GB "
        "| backlog worker % of a CPU | re-arms/s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for p in PATHS:
        rs = by_path[p.label]
        g = [r.gbit_s for r in rs]
        own = ("-" if rs[0].proxy_s is None
               else f"{statistics.median(r.proxy_s / r.gbytes for r in rs):.3f}")
        backlog = statistics.median(100 * r.backlog_s / r.seconds for r in rs)
        rearms = statistics.median(r.rearms / r.seconds for r in rs)
        lines.append(
            f"| {p.label} | {statistics.median(g):.2f} ({min(g):.2f}-{max(g):.2f}) "
            f"| {med(p.label, 'machine_per_gb'):.2f} | {med(p.label, 'tasks_per_gb'):.2f} "
            f"| {own} | {backlog:.0f} | {rearms:.0f} |")
    spliced, relay, direct = (med(x, "gbit_s") for x in (SPLICED, RELAY, DIRECT))
    ratio_relay, ratio_direct = spliced / relay, spliced / direct
    lines += [
        "",
        f"- default sockhash / user-space relay throughput: **{ratio_relay:.2f}x** "
        f"(target >= 3x: {'met' if ratio_relay >= 3 else '**not met**'})",
        f"- default sockhash / direct throughput: **{ratio_direct:.0%}** (target >= 75%: "
        f"{'met' if ratio_direct >= 0.75 else '**not met**'})",
        f"- user-space relay / direct throughput: {relay / direct:.0%}",
    ]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=int, default=5, help="iperf3 -t per run")
    ap.add_argument("--repeat", type=int, default=3, help="runs per path (median is reported)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("needs root (namespaces, BPF)", file=sys.stderr)
        return 2
    # SIGTERM (e.g. from timeout) must still run the namespace clean-up below.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    env = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rev": git_rev(),
           "cpu": cpu_model(), "load0": load_average()}
    namespaces = build_topology()
    cli, app, be = namespaces
    env |= {"tcp_rmem": sysctl(app, "net.ipv4.tcp_rmem"),
            "tcp_wmem": sysctl(app, "net.ipv4.tcp_wmem")}
    tracer = BacklogTracer()
    results: list[Result] = []
    try:
        for i in range(args.repeat):
            for p in PATHS:
                if p.engine is None:
                    results.append(measure(p.label, cli, be, BE_IP, args.seconds, None, tracer))
                else:
                    with proxy(app, p.engine) as pid:
                        results.append(measure(p.label, cli, be, APP_CLI_IP, args.seconds, pid,
                                               tracer))
                r = results[-1]
                print(f"[{i + 1}/{args.repeat}] {p.label}: {r.gbit_s:.2f} Gbit/s", file=sys.stderr)
    finally:
        tracer.close()
        for ns in namespaces:
            nsutil.remove_netns(ns)
    env["load1"] = load_average()
    env["hz"] = str(hz())
    print(markdown(results, args, env))
    return 0


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


if __name__ == "__main__":
    sys.exit(main())
