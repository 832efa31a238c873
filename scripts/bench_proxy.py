#!/usr/bin/env python3
"""Benchmark the TCP proxy: iperf3 through the sockhash splice, through the asyncio user-space
relay, and straight to the backend (routed by the appliance namespace), in one run.

Builds its own client/appliance/backend namespaces (10.81.x, removed at the end) and prints
a markdown section to stdout. CPU is whole-machine busy time from /proc/stat over each run:
spliced bytes are moved in softirq and kworker context, which no process is charged for,
so per-process CPU would flatter the splice. The proxy process's own CPU is listed too.

    sudo .venv/bin/python scripts/bench_proxy.py [--seconds 5] [--repeat 1]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import platform
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from xdpfw import netns as nsutil

CLI_IP, APP_CLI_IP, APP_BE_IP, BE_IP = "10.81.1.2", "10.81.1.1", "10.81.2.1", "10.81.2.2"
PORT = 5201
CTX = mp.get_context("fork")


@dataclass
class Result:
    path: str
    gbit_s: float
    gbytes: float
    busy_s: float
    proxy_cpu_s: float | None

    @property
    def cpu_per_gb(self) -> float:
        return self.busy_s / self.gbytes


def busy_jiffies() -> int:
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields[:8]) - idle


def proc_cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _engine_child(ns: str, mode: str, chan) -> None:
    from pyroute2 import netns as pnetns

    from xdpfw.proxy.engine import ProxyEngine

    pnetns.setns(ns)
    eng = ProxyEngine(APP_CLI_IP, PORT, lambda _a: (BE_IP, PORT), 1, mode=mode)  # type: ignore
    eng.start()
    chan.send(eng.mode)
    chan.recv()  # any message: stop
    c = eng.counters()
    eng.stop()
    chan.send((c.bytes_to_backend, c.bytes_to_client))


@contextlib.contextmanager
def proxy(ns: str, mode: str) -> Iterator[int]:
    parent, child = CTX.Pipe()
    p = CTX.Process(target=_engine_child, args=(ns, mode, child), daemon=True)
    p.start()
    if not parent.poll(60):
        p.terminate()
        raise RuntimeError(f"{mode} proxy did not start")
    got = parent.recv()
    if got != mode:
        p.terminate()
        raise RuntimeError(f"asked for a {mode} proxy, engine runs {got}")
    try:
        yield p.pid
    finally:
        parent.send("stop")
        parent.poll(30)
        p.join(10)


def iperf(cli: str, be: str, target: str, seconds: int) -> tuple[float, float]:
    """One iperf3 run client->backend; returns (bits/s, bytes received)."""
    srv = subprocess.Popen(["ip", "netns", "exec", be, "iperf3", "-s", "-1", "-p", str(PORT)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
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
        return end["bits_per_second"], end["bytes"]
    finally:
        with contextlib.suppress(subprocess.TimeoutExpired):
            srv.wait(10)
        if srv.poll() is None:
            srv.kill()
            srv.wait()


def measure(path: str, cli: str, be: str, target: str, seconds: int,
            proxy_pid: int | None) -> Result:
    cpu0 = proc_cpu_s(proxy_pid) if proxy_pid else 0.0
    j0 = busy_jiffies()
    bps, nbytes = iperf(cli, be, target, seconds)
    j1 = busy_jiffies()
    proxy_cpu = proc_cpu_s(proxy_pid) - cpu0 if proxy_pid else None
    return Result(path, bps / 1e9, nbytes / 1e9, (j1 - j0) / os.sysconf("SC_CLK_TCK"),
                  proxy_cpu)


def build_topology(gro: bool = False) -> tuple[str, str, str]:
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


PATHS = ["direct", "sockhash proxy", "user-space proxy"]


def markdown(results: list[Result], seconds: int, repeat: int, gro: bool) -> str:
    best = {r.path: r for r in sorted(results, key=lambda r: r.gbit_s)}  # best run per path
    direct, spliced, relay = best["direct"], best["sockhash proxy"], best["user-space proxy"]
    lines = [
        "## TCP proxy: kernel splice vs user-space relay vs direct",
        "",
        f"`scripts/bench_proxy.py --seconds {seconds} --repeat {repeat}"
        f"{' --gro' if gro else ''}` on "
        f"{platform.release()}, {os.cpu_count()} CPUs, veth GRO {'on' if gro else 'off'}; "
        "iperf3, one stream, client -> backend "
        "across two veth pairs (client | appliance | backend namespaces). Best of "
        f"{repeat} run(s) per path. CPU is whole-machine busy time (/proc/stat) per GB "
        "received, including iperf3 at both ends; the machine is shared, so expect noise.",
        "",
        "| path | throughput (Gbit/s) | machine CPU (s/GB) | proxy process CPU (s/GB) |",
        "|---|---:|---:|---:|",
    ]
    for r in sorted(best.values(), key=lambda r: PATHS.index(r.path)):
        own = "-" if r.proxy_cpu_s is None else f"{r.proxy_cpu_s / r.gbytes:.3f}"
        lines.append(f"| {r.path} | {r.gbit_s:.2f} | {r.cpu_per_gb:.2f} | {own} |")
    ratio_relay = spliced.gbit_s / relay.gbit_s
    ratio_direct = spliced.gbit_s / direct.gbit_s
    lines += [
        "",
        f"- sockhash / user-space throughput: **{ratio_relay:.2f}x** (target >= 3x: "
        f"{'met' if ratio_relay >= 3 else 'NOT met'})",
        f"- sockhash / direct throughput: **{ratio_direct:.0%}** (target >= 75%: "
        f"{'met' if ratio_direct >= 0.75 else 'NOT met'})",
    ]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=int, default=5, help="iperf3 -t per run")
    ap.add_argument("--repeat", type=int, default=1, help="runs per path (best is reported)")
    ap.add_argument("--gro", action="store_true", help="enable GRO on every veth end")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("needs root (namespaces, BPF)", file=sys.stderr)
        return 2
    # SIGTERM (e.g. from timeout) must still run the namespace clean-up below.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    namespaces = build_topology(args.gro)
    cli, app, be = namespaces
    results: list[Result] = []
    try:
        for _ in range(args.repeat):
            results.append(measure("direct", cli, be, BE_IP, args.seconds, None))
            for mode, label in (("sockhash", PATHS[1]), ("userspace", PATHS[2])):
                with proxy(app, mode) as pid:
                    results.append(measure(label, cli, be, APP_CLI_IP, args.seconds, pid))
    finally:
        for ns in namespaces:
            nsutil.remove_netns(ns)
    print(markdown(results, args.seconds, args.repeat, args.gro))
    return 0


if __name__ == "__main__":
    sys.exit(main())
