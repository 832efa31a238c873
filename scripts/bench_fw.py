#!/usr/bin/env python3
"""Benchmark of xdpfw as it ships: the daemon started as the README starts it, driven over its
API, every figure beside a baseline measured in the same run.

Each phase starts its own `xdpfw serve` (the command scripts/appliance.sh runs, default
settings; only --socket, --state-dir and --bpffs-dir are its own, so it runs beside tests and
other daemons; the lb phase adds a config file whose only setting is `[lb] netns`, where its
backend lives). Rules go in through POST /api/v1/rules/bulk as a text/plain blocklist, the
interface is attached through POST /api/v1/interfaces, and the per-packet figures are
`bpftool prog run` of the program attached to that interface (its id from `ip -j link` and
GET /api/v1/program, which must agree).

Phases (`--phases`, default all, in this order):
  calib     bare XDP_DROP and XDP_TX: bpftool prog run against BPF_PROG_TEST_RUN from Python
  exact     10,000 exact IPv4 addresses: xdpfw against xdp-filter (Debian's xdp-tools)
  v4        per --sizes N: /32 hit, /24 hit, miss, miss in a /24 holding a host rule, against a
            bare XDP_DROP and a minimal parse + one LPM lookup program on the same prefixes
  v6        100,000 IPv6 prefixes: against a minimal parse + LPM program on the same set
  load      the largest N: bulk load time, daemon VmRSS/VmHWM, 500 single adds, /8 adds
  lb        a tx service made over the API: conntrack hit against a bare XDP_TX
  sampling  drop-event sampling at 1 in 100 (the default) and 1 in 1 against off, /32 hit
  flood     trafgen from a namespace into a guarded veth: xdpfw, bare XDP_DROP, nftables

Every phase (each N of v4 is one) is written to a JSON-lines file the moment it ends; a phase
that fails is cleaned up and run once more, and both attempts are recorded. Everything the run
creates (namespaces, daemons, pins, xdp-filter, nftables tables, temporary files) is removed
at the end, on failure and on Ctrl-C too. The summary goes to the "## Firewall (as shipped)"
section of docs/perf.md.

Run as root from the repository root:
    .venv/bin/python scripts/bench_fw.py                          # everything, about 4-5 min
    .venv/bin/python scripts/bench_fw.py --phases v4 --sizes 1M    # one phase, one size
    .venv/bin/python scripts/bench_fw.py --report docs/perf/X.jsonl   # re-render a run
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib as B
from benchlib import XDP_DROP, XDP_NAMES, XDP_PASS, XDP_TX, Case, Daemon, Stat, log

ROOT = B.ROOT
PERF_MD = ROOT / "docs" / "perf.md"
PERF_DIR = ROOT / "docs" / "perf"
SECTION = "## Firewall (as shipped)"
SEED = 20261130
PHASES = ("calib", "exact", "v4", "v6", "load", "lb", "sampling", "flood")
DEFAULT_SIZES = (1_000, 100_000, 1_000_000, 2_000_000)
TARGET_SIZES = (1_000_000, 2_000_000)  # where the per-packet targets apply

# Addresses of the benchmark's own links (198.18.0.0/15, the benchmarking range), never in a
# generated rule set (their first octet is skipped, see benchlib.SKIPPED_FIRST_OCTETS).
LB_APP, LB_BACKEND, LB_CLIENT, LB_VIP, LB_PORT = (
    "198.18.0.1", "198.18.0.2", "198.18.0.50", "198.19.0.100", 80)
FLOOD_SENDER, FLOOD_RECEIVER = "198.19.250.1", "198.19.250.2"
FLOOD_SOURCES = "198.18.0.0/16"  # trafgen's sources 198.18.<rnd>.<rnd>; blocked as 256 /24s
SINGLE_ADD_NET = (100 << 24) | (64 << 16)  # 100.64.0.0/10: first octet 100 is never generated
SLASH8_OCTETS = (169, 172, 192, 203, 10)  # /8s that no generated prefix overlaps


# -- context -----------------------------------------------------------------------------------


@dataclass
class Ctx:
    args: argparse.Namespace
    scratch: B.Scratch
    cpu: int | None
    runs: int
    repeat: int
    _v4: list[int] = field(default_factory=list)
    _frames: dict[bytes, Path] = field(default_factory=dict)

    def v4_set(self, n: int) -> list[int]:
        """The first n prefixes of one seeded list, so every N has the same mix."""
        if len(self._v4) < n:
            log(f"generating {n:,} random IPv4 prefixes ({B.V4_MIX_TEXT})")
            self._v4 = B.v4_prefixes(max(n, max(self.args.sizes)), SEED)
        return self._v4[:n]

    def frame(self, data: bytes) -> Path:
        if data not in self._frames:
            d = self.scratch.tmp / "frames"
            d.mkdir(exist_ok=True)
            path = d / f"f{len(self._frames)}.bin"
            path.write_bytes(data)
            self._frames[data] = path
        return self._frames[data]

    def measure(self, cases: Sequence[Case], **kw) -> dict[str, Stat]:
        return B.measure(cases, self.runs, self.repeat, self.cpu, **kw)

    @property
    def method(self) -> dict:
        return {"runs": self.runs, "repeat": self.repeat, "cpu": self.cpu,
                "tool": "bpftool prog run (BPF_PROG_TEST_RUN), median of runs, interleaved"}


# -- targets -----------------------------------------------------------------------------------


def ratio_target(tid: str, what: str, value: float, baseline: float, baseline_what: str,
                 op: str, limit: float, unit: str = "ns") -> dict:
    r = value / baseline if baseline else float("nan")
    ok = r <= limit if op == "<=" else r >= limit
    return {"id": tid, "what": what, "kind": "ratio", "value": value, "unit": unit,
            "baseline": baseline, "baseline_what": baseline_what, "ratio": r, "op": op,
            "limit": limit, "pass": ok}


def abs_target(tid: str, what: str, value: float, unit: str, op: str, limit: float,
               reference: float | None = None, reference_what: str = "") -> dict:
    ok = value <= limit if op == "<=" else value >= limit
    r = value / reference if reference else None
    return {"id": tid, "what": what, "kind": "absolute", "value": value, "unit": unit,
            "baseline": reference, "baseline_what": reference_what, "ratio": r, "op": op,
            "limit": limit, "pass": ok}


def info_target(tid: str, what: str, value: float, unit: str, baseline: float,
                baseline_what: str) -> dict:
    return {"id": tid, "what": what, "kind": "info", "value": value, "unit": unit,
            "baseline": baseline, "baseline_what": baseline_what,
            "ratio": value / baseline if baseline else None, "op": "", "limit": None,
            "pass": None}


def row(program: str, packet: str, source: str, expect: int, st: Stat,
        ratios: dict[str, float] | None = None) -> dict:
    return {"program": program, "packet": packet, "source": source,
            "verdict": XDP_NAMES[expect], "ns": st.json(), "ratios": ratios or {}}


# -- shared steps ------------------------------------------------------------------------------


def guarded_daemon(ctx: Ctx, stack: contextlib.ExitStack, what: str,
                   config: str | None = None, ns: str | None = None,
                   ifname: str = "xb0") -> tuple[Daemon, str, str]:
    """A namespace with a veth, a daemon, and the veth's end attached in generic mode."""
    if ns is None:
        ns = B.netns_add(ctx.scratch, what)
        stack.callback(_drop_netns, ctx.scratch, ns)
        B.veth(ns, ifname, ns, ifname.replace("0", "1"))
    d = start_daemon(ctx, stack, what, config)
    d.attach(ifname, ns, "generic")
    return d, ns, ifname


def start_daemon(ctx: Ctx, stack: contextlib.ExitStack, what: str,
                 config: str | None = None) -> Daemon:
    d = Daemon(ctx.scratch, what, config)
    stack.callback(d.stop)  # registered after the namespace: it goes first
    log(f"{what}: {d.command}")
    d.wait_healthy()
    return d


def _drop_netns(scratch: B.Scratch, ns: str) -> None:
    B.netns_del(ns)
    if ns in scratch.namespaces:
        scratch.namespaces.remove(ns)


def bulk_load(d: Daemon, text: str, n: int, what: str) -> float:
    log(f"{what}: POST /api/v1/rules/bulk, {n:,} prefixes ({len(text) / 2**20:.1f} MiB)")
    seconds, answer = d.bulk_text(text)
    if answer.get("added") != n:
        raise B.BenchError(f"bulk load added {answer.get('added')}, sent {n}")
    rules = d.api.get("/healthz")["rules"]
    if rules != n:
        raise B.BenchError(f"after the bulk load the daemon holds {rules} rules, sent {n}")
    return seconds


def ref_prog(stack: contextlib.ExitStack, name: str, cflags: Sequence[str] = ()) -> B.RefProg:
    p = B.RefProg(name, cflags)
    stack.callback(p.close)
    return p


def checked_counters(d: Daemon, ns: str, ifname: str, cases: Sequence[Case],
                     before: dict[str, int], runs: int, repeat: int) -> str:
    """The daemon's own counters of the interface must have grown by exactly the runs of the
    cases that ran its program: proof that the figures are of the attached instance."""
    after = d.iface_counters(ifname, ns)
    prog = {c.prog_id for c in cases if c.name.startswith("xdpfw")}
    want = {"dropped": 0, "passed": 0, "forwarded": 0}
    key = {XDP_DROP: "dropped", XDP_PASS: "passed", XDP_TX: "forwarded"}
    for c in cases:
        if c.prog_id in prog:
            want[key[c.expect]] += runs * repeat
    got = {k: after[k] - before[k] for k in want}
    if got != want:
        raise B.BenchError(f"the daemon's counters of {ifname} moved by {got}, the runs of its "
                           f"program {sorted(prog)} account for {want}")
    return (f"GET /api/v1/stats: {ifname} counted {got['dropped']:,} dropped, "
            f"{got['passed']:,} passed, {got['forwarded']:,} forwarded during the runs: exactly "
            f"the runs of program {', '.join(map(str, sorted(prog)))}")


def sample_rate(d: Daemon) -> int:
    return int(d.api.get("/api/v1/events/config")["sample_rate"])


# -- phases ------------------------------------------------------------------------------------


def phase_calib(ctx: Ctx, stack: contextlib.ExitStack) -> dict:
    """What the measuring tool adds: bpftool against the same BPF_PROG_TEST_RUN issued from
    this process, on bare programs."""
    drop, tx = ref_prog(stack, "xdp_drop"), ref_prog(stack, "xdp_tx")
    frame = B.udp4("198.18.1.1")
    path = ctx.frame(frame)
    bpftool: dict[str, list[float]] = {"xdp_drop": [], "xdp_tx": []}
    raw: dict[str, list[float]] = {"xdp_drop": [], "xdp_tx": []}
    aff = os.sched_getaffinity(0)
    try:
        if ctx.cpu is not None:
            os.sched_setaffinity(0, {ctx.cpu})
        for _ in range(ctx.runs):
            for name, prog, expect in (("xdp_drop", drop, XDP_DROP), ("xdp_tx", tx, XDP_TX)):
                got, ns = B.bpftool_run(prog.id, path, ctx.repeat, ctx.cpu)
                rv, ns_raw = B.bpf_test_run(prog.fd, frame, ctx.repeat)
                if got != expect or rv != expect:
                    raise B.BenchError(f"{name} returned {got}/{rv}")
                bpftool[name].append(ns)
                raw[name].append(float(ns_raw))
    finally:
        os.sched_setaffinity(0, aff)
    rows = []
    for name in ("xdp_drop", "xdp_tx"):
        a, b = Stat.of(bpftool[name]), Stat.of(raw[name])
        rows.append(row(f"bare {name.upper()}", "60-byte UDP", "198.18.1.1",
                        XDP_DROP if name == "xdp_drop" else XDP_TX, a,
                        {"vs raw test run": a.median / b.median}))
        rows.append(row(f"bare {name.upper()}, BPF_PROG_TEST_RUN from Python", "60-byte UDP",
                        "198.18.1.1", XDP_DROP if name == "xdp_drop" else XDP_TX, b,
                        {"vs raw test run": 1.0}))
    return {"config": {"method": ctx.method, "programs": ["scripts/bench_progs/xdp_drop.c",
                                                          "scripts/bench_progs/xdp_tx.c"]},
            "rows": rows, "targets": [], "checks": []}


def phase_v4(ctx: Ctx, stack: contextlib.ExitStack, n: int) -> dict:
    what = f"v4-{n}"
    prefixes = ctx.v4_set(n)
    probes = B.v4_probes(prefixes, SEED + n)
    d, ns, ifname = guarded_daemon(ctx, stack, what)
    bulk_s = bulk_load(d, B.v4_text(prefixes), n, what)
    prog_id = d.prog_id(ifname, ns)
    bare = ref_prog(stack, "xdp_drop")
    lpm = ref_prog(stack, "lpm_min", [f"-DLPM_MAX={max(n, 1024)}"])
    B.bpf_update_many(lpm.map_fd("trie"), B.v4_lpm_keys(prefixes), bytes(n), n)
    expect = {"/32 hit": XDP_DROP, "/24 hit": XDP_DROP, "miss": XDP_PASS,
              "miss in host /24": XDP_PASS}
    cases = []
    for p in probes:
        f = ctx.frame(B.udp4(p.addr))
        cases.append(Case(f"xdpfw {p.name}", prog_id, f, expect[p.name]))
        cases.append(Case(f"lpm {p.name}", lpm.id, f, expect[p.name]))
    cases.append(Case("bare", bare.id, ctx.frame(B.udp4(probes[0].addr)), XDP_DROP))
    before = d.iface_counters(ifname, ns)
    log(f"{what}: bpftool prog run, {len(cases)} cases x {ctx.runs}")
    st = ctx.measure(cases)
    check = checked_counters(d, ns, ifname, cases, before, ctx.runs, ctx.repeat)
    base = st["bare"].median
    rows, targets = [], []
    for p in probes:
        x, m = st[f"xdpfw {p.name}"], st[f"lpm {p.name}"]
        rows.append(row(f"xdpfw (attached, prog {prog_id})", p.name, p.addr, expect[p.name], x,
                        {"vs bare": x.median / base, "vs min LPM": x.median / m.median}))
        rows.append(row("minimal LPM (lpm_min.c)", p.name, p.addr, expect[p.name], m,
                        {"vs bare": m.median / base, "vs min LPM": 1.0}))
        if n in TARGET_SIZES:
            targets.append(ratio_target(f"v4.{n}.{p.name}", f"{short_n(n)} IPv4 prefixes, {p.name}",
                                        x.median, base, "bare XDP_DROP", "<=", 2.0))
    rows.append(row("bare XDP_DROP (xdp_drop.c)", "any", probes[0].addr, XDP_DROP, st["bare"],
                    {"vs bare": 1.0}))
    return {
        "config": {"daemon": d.command, "attach": "generic", "netns": ns, "ifname": ifname,
                   "prog_id": prog_id, "rules": n, "mix": B.V4_MIX_TEXT,
                   "sample_rate": sample_rate(d), "frame": "60-byte IPv4/UDP (64 on the wire)",
                   "method": ctx.method},
        "probes": [vars(p) for p in probes],
        "rows": rows, "targets": targets,
        "info": {"bulk_load_s": bulk_s, "healthy_after_s": d.healthy_after},
        "checks": [check, f"program {prog_id}: `ip -j link` and GET /api/v1/program agree"],
    }


def short_n(n: int) -> str:
    """1,000,000 -> 1M."""
    for div, suffix in ((1_000_000, "M"), (1_000, "k")):
        if n >= div and n % (div // 10) == 0:
            v = n / div
            return f"{v:g}{suffix}"
    return f"{n:,}"


XDP_FILTER_MAP = "/sys/fs/bpf/xdp-filter/filter_ipv4"
XDP_FILTER_SRC = "01 00 00 00 00 00 00 00"  # MAP_FLAG_SRC, a per-CPU u64 (all CPUs)


def load_xdp_filter(ctx: Ctx, ns: str, ifname: str, hosts: Sequence[int]) -> tuple[int, float]:
    """xdp-filter on ifname (skb mode), its source-address map filled in one `bpftool batch`
    (the CLI `xdp-filter ip` adds one address per process). `ip netns exec` starts with a
    fresh /sys, so the shell mounts a bpffs of its own: the pins vanish with it, the program
    stays, held by the interface. Returns (program id, seconds to fill)."""
    batch = ctx.scratch.tmp / f"xdp-filter-{ns}.batch"
    with batch.open("w") as f:
        for h in hosts:
            key = " ".join(f"{b:02x}" for b in (h >> 8).to_bytes(4, "big"))
            f.write(f"map update pinned {XDP_FILTER_MAP} key hex {key} value hex "
                    f"{XDP_FILTER_SRC}\n")
    script = ("set -e; mount -t bpf bpf /sys/fs/bpf; "
              f"xdp-filter load --mode skb --features ipv4 {ifname}; "
              f"t0=$(date +%s.%N); bpftool batch file {batch} >/dev/null; t1=$(date +%s.%N); "
              'echo "fill $t0 $t1"')
    out = B.sh(["ip", "netns", "exec", ns, "sh", "-c", script], "loading xdp-filter").stdout
    m = re.search(r"fill ([\d.]+) ([\d.]+)", out)
    prog_id = B.xdp_prog_id(ns, ifname)
    if prog_id is None:
        raise B.BenchError(f"xdp-filter reported success but {ifname} has no XDP program")
    return prog_id, float(m.group(2)) - float(m.group(1)) if m else float("nan")


def xdp_filter_version() -> str:
    out = B.sh(["dpkg-query", "-W", "-f", "${Version}", "xdp-tools"], "xdp-tools version",
               check=False).stdout
    return out.strip() or "unknown"


def phase_exact(ctx: Ctx, stack: contextlib.ExitStack) -> dict:
    n = ctx.args.exact_size
    hosts = B.v4_exact(n, SEED + 1)
    probes = [p for p in B.v4_probes(hosts, SEED + 2) if p.name != "/24 hit"]
    ns = B.netns_add(ctx.scratch, "exact")
    stack.callback(_drop_netns, ctx.scratch, ns)
    B.veth(ns, "xb0", ns, "xb1")
    B.veth(ns, "xf0", ns, "xf1")
    d, ns, ifname = guarded_daemon(ctx, stack, "exact", ns=ns)
    bulk_s = bulk_load(d, B.v4_text(hosts), n, "exact")
    prog_id = d.prog_id(ifname, ns)
    log(f"exact: xdp-filter {xdp_filter_version()} on xf0, {n:,} source addresses")
    xf_id, fill_s = load_xdp_filter(ctx, ns, "xf0", hosts)
    xf_name = B.sh(["bpftool", "-j", "prog", "show", "id", str(xf_id)], "xdp-filter prog").stdout
    bare = ref_prog(stack, "xdp_drop")
    expect = {"/32 hit": XDP_DROP, "miss": XDP_PASS, "miss in host /24": XDP_PASS}
    cases = []
    for p in probes:
        f = ctx.frame(B.udp4(p.addr))
        cases += [Case(f"xdpfw {p.name}", prog_id, f, expect[p.name]),
                  Case(f"xdp-filter {p.name}", xf_id, f, expect[p.name])]
    cases.append(Case("bare", bare.id, ctx.frame(B.udp4(probes[0].addr)), XDP_DROP))
    before = d.iface_counters(ifname, ns)
    log(f"exact: bpftool prog run, {len(cases)} cases x {ctx.runs}")
    st = ctx.measure(cases)
    check = checked_counters(d, ns, ifname, cases, before, ctx.runs, ctx.repeat)
    base = st["bare"].median
    rows, targets = [], []
    for p in probes:
        x, f = st[f"xdpfw {p.name}"], st[f"xdp-filter {p.name}"]
        rows.append(row(f"xdpfw (attached, prog {prog_id})", p.name, p.addr, expect[p.name], x,
                        {"vs xdp-filter": x.median / f.median, "vs bare": x.median / base}))
        rows.append(row(f"xdp-filter {xdp_filter_version()} (prog {xf_id})", p.name, p.addr,
                        expect[p.name], f, {"vs xdp-filter": 1.0, "vs bare": f.median / base}))
        if p.name in ("/32 hit", "miss"):
            kind = "hit" if p.name == "/32 hit" else "miss"
            targets.append(ratio_target(f"exact.{kind}", f"{n:,} exact addresses, {kind}",
                                        x.median, f.median, "xdp-filter", "<=", 0.8))
    rows.append(row("bare XDP_DROP (xdp_drop.c)", "any", probes[0].addr, XDP_DROP, st["bare"],
                    {"vs bare": 1.0}))
    return {
        "config": {"daemon": d.command, "attach": "generic", "netns": ns, "prog_id": prog_id,
                   "rules": n, "sample_rate": sample_rate(d), "frame": "60-byte IPv4/UDP",
                   "xdp_filter": f"xdp-tools {xdp_filter_version()}: `xdp-filter load --mode "
                   "skb --features ipv4 xf0`, its filter_ipv4 map filled with the same "
                   "addresses (src flag) by one `bpftool batch`; its attached program run by "
                   "id (libxdp loads it without a dispatcher here)",
                   "xdp_filter_prog": xf_name.strip(), "method": ctx.method},
        "probes": [vars(p) for p in probes], "rows": rows, "targets": targets,
        "info": {"bulk_load_s": bulk_s, "xdp_filter_fill_s": fill_s},
        "checks": [check, f"program {prog_id}: `ip -j link` and GET /api/v1/program agree",
                   f"xdp-filter: program {xf_id} is the one `ip -j link` shows on xf0"],
    }


def phase_v6(ctx: Ctx, stack: contextlib.ExitStack) -> dict:
    n = ctx.args.v6_size
    log(f"v6: generating {n:,} IPv6 prefixes ({B.V6_MIX_TEXT})")
    prefixes = B.v6_prefixes(n, SEED + 3)
    probes = B.v6_probes(prefixes, SEED + 4)
    d, ns, ifname = guarded_daemon(ctx, stack, "v6")
    bulk_s = bulk_load(d, B.v6_text(prefixes), n, "v6")
    prog_id = d.prog_id(ifname, ns)
    bare = ref_prog(stack, "xdp_drop")
    lpm = ref_prog(stack, "lpm6_min", [f"-DLPM_MAX={max(n, 1024)}"])
    B.bpf_update_many(lpm.map_fd("trie"), B.v6_lpm_keys(prefixes), bytes(n), n)
    expect = {"/128 hit": XDP_DROP, "/64 hit": XDP_DROP, "miss": XDP_PASS}
    cases = []
    for p in probes:
        f = ctx.frame(B.udp6(p.addr))
        cases += [Case(f"xdpfw {p.name}", prog_id, f, expect[p.name]),
                  Case(f"lpm6 {p.name}", lpm.id, f, expect[p.name])]
    cases.append(Case("bare", bare.id, ctx.frame(B.udp6(probes[0].addr)), XDP_DROP))
    before = d.iface_counters(ifname, ns)
    log(f"v6: bpftool prog run, {len(cases)} cases x {ctx.runs}")
    st = ctx.measure(cases)
    check = checked_counters(d, ns, ifname, cases, before, ctx.runs, ctx.repeat)
    base = st["bare"].median
    rows, targets = [], []
    for p in probes:
        x, m = st[f"xdpfw {p.name}"], st[f"lpm6 {p.name}"]
        rows.append(row(f"xdpfw (attached, prog {prog_id})", p.name, p.addr, expect[p.name], x,
                        {"vs min LPM": x.median / m.median, "vs bare": x.median / base}))
        rows.append(row("minimal IPv6 LPM (lpm6_min.c)", p.name, p.addr, expect[p.name], m,
                        {"vs min LPM": 1.0, "vs bare": m.median / base}))
        targets.append(ratio_target(f"v6.{p.name}", f"{short_n(n)} IPv6 prefixes, {p.name}",
                                    x.median, m.median, "minimal parse + LPM", "<=", 1.3))
    rows.append(row("bare XDP_DROP (xdp_drop.c)", "any", probes[0].addr, XDP_DROP, st["bare"],
                    {"vs bare": 1.0}))
    return {
        "config": {"daemon": d.command, "attach": "generic", "netns": ns, "prog_id": prog_id,
                   "rules": n, "mix": B.V6_MIX_TEXT, "sample_rate": sample_rate(d),
                   "frame": "64-byte IPv6/UDP", "method": ctx.method},
        "probes": [vars(p) for p in probes], "rows": rows, "targets": targets,
        "info": {"bulk_load_s": bulk_s},
        "checks": [check, f"program {prog_id}: `ip -j link` and GET /api/v1/program agree"],
    }


def phase_load(ctx: Ctx, stack: contextlib.ExitStack) -> dict:
    n = max(ctx.args.sizes)
    prefixes = ctx.v4_set(n)
    text = B.v4_text(prefixes)
    d, ns, ifname = guarded_daemon(ctx, stack, "load")
    mem_idle = d.memory()
    prog_id = d.prog_id(ifname, ns)
    # The HTTP round trip itself, for scale: GET /healthz on the same connection.
    rtt = []
    for _ in range(200):
        t0 = time.perf_counter()
        d.api.get("/healthz")
        rtt.append(time.perf_counter() - t0)
    bulk_s = bulk_load(d, text, n, "load")
    mem_loaded = d.memory()
    probe = B.ip4(prefixes[-1] >> 8)
    got, _ = B.bpftool_run(prog_id, ctx.frame(B.udp4(probe)), 1, ctx.cpu)
    if got != XDP_DROP:
        raise B.BenchError(f"after the bulk load, {probe} (the last prefix) gets {got}")
    log(f"load: {ctx.args.single_adds} single POST /api/v1/rules")
    lat = []
    for i in range(ctx.args.single_adds):
        body = {"prefix": f"{B.ip4(SINGLE_ADD_NET | i)}/32", "action": "drop",
                "comment": "bench single add"}
        t0 = time.perf_counter()
        d.api.post("/api/v1/rules", json_body=body, ok=(201,))
        lat.append(time.perf_counter() - t0)
    last = B.ip4(SINGLE_ADD_NET | (ctx.args.single_adds - 1))
    got, _ = B.bpftool_run(prog_id, ctx.frame(B.udp4(last)), 1, ctx.cpu)
    if got != XDP_DROP:
        raise B.BenchError(f"the last single add ({last}) answered 201 but its packet gets {got}")
    slash8 = []
    for octet in SLASH8_OCTETS:
        t0 = time.perf_counter()
        d.api.post("/api/v1/rules", json_body={"prefix": f"{octet}.0.0.0/8", "action": "drop"},
                   ok=(201,))
        slash8.append(time.perf_counter() - t0)
        got, _ = B.bpftool_run(prog_id, ctx.frame(B.udp4(f"{octet}.1.2.3")), 1, ctx.cpu)
        if got != XDP_DROP:
            raise B.BenchError(f"{octet}.0.0.0/8 answered 201 but {octet}.1.2.3 gets {got}")
    mem_end = d.memory()
    floor = load_floor(ctx, prefixes)
    floor_s = floor["hash_s"] + floor["split_trie_s"]
    lat_ms, rtt_ms = [x * 1e3 for x in lat], [x * 1e3 for x in rtt]
    mib = {k: v / 1024 for k, v in mem_end.items()}
    p99 = B.percentile(lat_ms, 99)
    targets = [
        abs_target(f"load.{n}.rss", f"daemon VmRSS with {short_n(n)} rules (after the adds)",
                   mib["VmRSS"], "MiB", "<=", 600, mem_idle["VmRSS"] / 1024,
                   "VmRSS of the idle daemon at start"),
        abs_target(f"load.{n}.hwm", f"daemon VmHWM (peak RSS) with {short_n(n)} rules",
                   mib["VmHWM"], "MiB", "<=", 600, mem_idle["VmRSS"] / 1024,
                   "VmRSS of the idle daemon at start"),
        abs_target(f"load.{n}.bulk", f"bulk load of {short_n(n)} prefixes (text/plain, HTTP "
                   "included)", bulk_s, "s", "<=", 6.0, floor_s,
                   "kernel floor: /32s into a hash + the rest into a trie, one batch each"),
        abs_target(f"load.{n}.add_p99", f"single add p99 on {short_n(n)} rules ({len(lat)} adds)",
                   p99, "ms", "<=", 20.0, B.percentile(rtt_ms, 99),
                   "p99 of GET /healthz on the same connection"),
        abs_target(f"load.{n}.slash8", f"adding a /8 on {short_n(n)} rules (worst of "
                   f"{len(slash8)})", max(slash8) * 1e3, "ms", "<=", 50.0,
                   statistics.median(lat_ms), "median single /32 add"),
    ]
    return {
        "config": {"daemon": d.command, "attach": "generic", "netns": ns, "prog_id": prog_id,
                   "rules": n, "mix": B.V4_MIX_TEXT, "sample_rate": sample_rate(d),
                   "client": "one kept-alive HTTP/1.1 connection over the unix socket, "
                   "sequential requests (Python http.client)"},
        "rows": [], "targets": targets,
        "info": {
            "bulk_load_s": bulk_s, "bulk_bytes": len(text), "healthy_after_s": d.healthy_after,
            "memory_kib": {"idle": mem_idle, "after_bulk": mem_loaded, "end": mem_end},
            "single_add_ms": {"p50": B.percentile(lat_ms, 50), "p99": p99, "max": max(lat_ms),
                              "mean": statistics.mean(lat_ms), "n": len(lat_ms)},
            "slash8_ms": [x * 1e3 for x in slash8],
            "healthz_ms": {"p50": B.percentile(rtt_ms, 50), "p99": B.percentile(rtt_ms, 99)},
            "floor": floor,
        },
        "checks": [f"bpftool prog run of {probe} (the last prefix loaded), of {last} (the last "
                   "single add) and of x.1.2.3 after each /8 add: XDP_DROP on the attached "
                   f"program {prog_id}"],
    }


def load_floor(ctx: Ctx, prefixes: Sequence[int]) -> dict:
    """What the kernel alone takes to hold the same prefixes: fresh maps made with bpftool,
    filled with one BPF_MAP_UPDATE_BATCH each, from this process. Two layouts: one LPM trie of
    everything, and the README's (host prefixes in an exact-match hash, the rest in a trie)."""
    n = len(prefixes)
    hosts = [p for p in prefixes if p & 0xff == 32]
    rest = [p for p in prefixes if p & 0xff != 32]
    out: dict[str, float] = {"hosts": len(hosts), "rest": len(rest)}
    t0 = time.perf_counter()
    all_keys, rest_keys = B.v4_lpm_keys(prefixes), B.v4_lpm_keys(rest)
    host_keys = b"".join((p >> 8).to_bytes(4, "big") for p in hosts)
    out["pack_s"] = time.perf_counter() - t0
    for name, kind, ksz, keys, count in (
            ("trie_s", "lpm_trie", 8, all_keys, n), ("hash_s", "hash", 4, host_keys, len(hosts)),
            ("split_trie_s", "lpm_trie", 8, rest_keys, len(rest))):
        if not count:
            out[name] = 0.0
            continue
        log(f"load: floor: {count:,} keys into a fresh {kind}, one batch")
        fd = B.scratch_map(ctx.scratch, kind, ksz, 1, count)
        try:
            t0 = time.perf_counter()
            B.bpf_update_many(fd, keys, bytes(count), count, chunk=count)
            out[name] = time.perf_counter() - t0
        finally:
            os.close(fd)
    return out


def phase_lb(ctx: Ctx, stack: contextlib.ExitStack) -> dict:
    app = B.netns_add(ctx.scratch, "lbapp")
    stack.callback(_drop_netns, ctx.scratch, app)
    be = B.netns_add(ctx.scratch, "lbbe")
    stack.callback(_drop_netns, ctx.scratch, be)
    B.veth(app, "lb0", be, "eth0", f"{LB_APP}/24", f"{LB_BACKEND}/24")
    B.sh(["ip", "-n", be, "addr", "add", f"{LB_VIP}/32", "dev", "lo"], "VIP on the backend")
    config = f'# bench_fw.py lb phase: the backends are reached in this namespace\n[lb]\n' \
             f'netns = "{app}"\n'
    d, _, ifname = guarded_daemon(ctx, stack, "lb", config=config, ns=app, ifname="lb0")
    prog_id = d.prog_id(ifname, app)
    svc = d.api.post("/api/v1/services", json_body={
        "vip": LB_VIP, "port": LB_PORT, "proto": "tcp", "forward": "tx",
        "backends": [{"address": LB_BACKEND}]}, ok=(201,))
    backends = d.api.get(f"/api/v1/services/{svc['id']}/backends")
    if not backends or not backends[0]["resolved"] or not backends[0]["in_table"]:
        raise B.BenchError(f"the backend is not usable: {backends}")
    frame = ctx.frame(B.tcp4(LB_CLIENT, LB_VIP, 40000, LB_PORT))
    before = d.iface_counters(ifname, app)
    got, first_ns = B.bpftool_run(prog_id, frame, 1, ctx.cpu)  # the flow's first packet
    if got != XDP_TX:
        raise B.BenchError(f"the first packet of the flow got {XDP_NAMES.get(got, got)}, not "
                           "XDP_TX")
    bare = ref_prog(stack, "xdp_tx")
    cases = [Case("xdpfw ct hit", prog_id, frame, XDP_TX), Case("bare", bare.id, frame, XDP_TX)]
    log(f"lb: bpftool prog run, {len(cases)} cases x {ctx.runs}")
    st = ctx.measure(cases)
    after = d.iface_counters(ifname, app)
    fwd = after["forwarded"] - before["forwarded"]
    want = ctx.runs * ctx.repeat + 1
    if fwd != want:
        raise B.BenchError(f"{ifname} counted {fwd} forwarded packets, the runs were {want}")
    svc_after = d.api.get(f"/api/v1/services/{svc['id']}")
    x, b = st["xdpfw ct hit"], st["bare"]
    return {
        "config": {"daemon": d.command, "config_file": config, "attach": "generic",
                   "netns": app, "prog_id": prog_id,
                   "service": {"vip": LB_VIP, "port": LB_PORT, "forward": "tx",
                               "backend": LB_BACKEND},
                   "frame": f"60-byte TCP ACK {LB_CLIENT}:40000 -> {LB_VIP}:{LB_PORT}",
                   "method": ctx.method},
        "rows": [row(f"xdpfw (attached, prog {prog_id}), conntrack hit", "tcp flow", LB_CLIENT,
                     XDP_TX, x, {"vs bare": x.median / b.median}),
                 row("bare XDP_TX (xdp_tx.c)", "tcp flow", LB_CLIENT, XDP_TX, b,
                     {"vs bare": 1.0})],
        "targets": [ratio_target("lb.ct_hit", "LB conntrack hit (tx service, established "
                                 "flow)", x.median, b.median, "bare XDP_TX", "<=", 3.0)],
        "info": {"first_packet_ns_one_cold_run": first_ns, "service": svc_after},
        "checks": [f"the flow's first run returned XDP_TX; {ifname} then counted {fwd:,} "
                   "forwarded: the first packet and every timed run (GET /api/v1/stats)"],
    }


def phase_sampling(ctx: Ctx, stack: contextlib.ExitStack) -> dict:
    n = ctx.args.sampling_size
    prefixes = ctx.v4_set(n)
    probe = B.v4_probes(prefixes, SEED + n)[0]
    d, ns, ifname = guarded_daemon(ctx, stack, "sampling")
    default_rate = sample_rate(d)
    bulk_load(d, B.v4_text(prefixes), n, "sampling")
    prog_id = d.prog_id(ifname, ns)
    bare = ref_prog(stack, "xdp_drop")
    frame = ctx.frame(B.udp4(probe.addr))
    rates = {"sampling off (0)": 0, f"1 in {default_rate} (default)": default_rate,
             "1 in 1": 1}
    cases = [Case(name, prog_id, frame, XDP_DROP) for name in rates]
    cases.append(Case("bare", bare.id, frame, XDP_DROP))

    def set_rate(c: Case) -> None:
        if c.name in rates:
            d.api.put("/api/v1/events/config", json_body={"sample_rate": rates[c.name]})

    log(f"sampling: rates {list(rates.values())}, interleaved")
    before = d.api.get("/api/v1/events/config")["read"]
    try:
        st = ctx.measure(cases, between=set_rate)
    finally:
        d.api.put("/api/v1/events/config", json_body={"sample_rate": default_rate})
    events = d.api.get("/api/v1/events/config")["read"] - before
    off = st["sampling off (0)"].median
    rows, targets = [], []
    for name, rate in rates.items():
        s = st[name]
        rows.append(row(f"xdpfw (attached, prog {prog_id}), {name}", "/32 hit", probe.addr,
                        XDP_DROP, s, {"vs off": s.median / off,
                                      "vs bare": s.median / st["bare"].median}))
        if rate:
            targets.append(info_target(f"sampling.{rate}", f"drop-event sampling {name}: "
                                       f"+{s.median - off:.0f} ns per dropped packet",
                                       s.median, "ns", off, "sampling off"))
    rows.append(row("bare XDP_DROP", "any", probe.addr, XDP_DROP, st["bare"],
                    {"vs bare": 1.0}))
    return {
        "config": {"daemon": d.command, "attach": "generic", "netns": ns, "prog_id": prog_id,
                   "rules": n, "default_sample_rate": default_rate, "frame": "60-byte IPv4/UDP",
                   "method": {**ctx.method, "note": "PUT /api/v1/events/config before each "
                              "run of xdpfw"}},
        "rows": rows, "targets": targets,
        "info": {"events_read_by_daemon": events},
        "checks": [f"program {prog_id}: `ip -j link` and GET /api/v1/program agree; every run "
                   "returned XDP_DROP"],
    }


# -- flood -------------------------------------------------------------------------------------

TRAFGEN_CFG = """\
/* 60-byte frames (64 on the wire): UDP from 198.18.<rnd>.<rnd> to {dst}; by bench_fw.py */
{{
  {dmac},
  0x02, 0x00, 0x00, 0x00, 0x00, 0x01,
  c16(0x0800),
  0x45, 0x00, c16(46), drnd(2), c16(0x4000), 64, 17, csumip(14, 33),
  198, 18, drnd(), drnd(),
  {dst_bytes},
  c16(40000), c16(9), c16(26), c16(0),
  fill(0x00, 18)
}}
"""
NFT_TABLE = "xdpfwbench"
FLOOD_MODES = ("none", "bare XDP_DROP", "xdpfw", "nftables")


def nft_ruleset(prefix_text: str, ifname: str) -> str:
    elements = ",\n".join(f"    {ln}" for ln in prefix_text.split())
    return (f"table netdev {NFT_TABLE} {{\n  set blocked {{\n    type ipv4_addr; flags "
            f"interval;\n    elements = {{\n{elements}\n    }}\n  }}\n  chain ingress {{\n"
            f'    type filter hook ingress device "{ifname}" priority -500; policy accept;\n'
            "    ip saddr @blocked counter drop\n  }\n}\n")


def nft_counter(ns: str) -> int:
    out = B.sh(["ip", "netns", "exec", ns, "nft", "list", "chain", "netdev", NFT_TABLE,
                "ingress"], "reading the nft counter").stdout
    m = re.search(r"counter packets (\d+)", out)
    return int(m.group(1)) if m else 0


def settle(read: Callable[[], int], timeout: float = 5.0) -> int:
    """Poll a counter until it stops moving (softirq may still drain the veth ring)."""
    last = read()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = read()
        if now == last:
            return now
        last = now
    return last


@dataclass
class FloodRig:
    sender: str
    receiver: str
    cfg: Path
    nft: Path
    daemon: Daemon
    bare: B.RefProg
    ifname: str = "xbr0"


def run_trafgen(rig: FloodRig, count: int) -> float:
    """Send count frames; trafgen's own elapsed seconds."""
    out = B.sh(["ip", "netns", "exec", rig.sender, "trafgen", "--dev", "xbs0", "--conf",
                str(rig.cfg), "--num", str(count), "--cpus", "1", "--no-sock-mem", "-Q"],
               "trafgen", timeout=120)
    text = out.stdout + out.stderr
    sent = re.search(r"(\d+) packets outgoing", text)
    el = re.search(r"(\d+) sec, (\d+) usec", text)
    if not sent or not el or int(sent.group(1)) != count:
        raise B.BenchError(f"unexpected trafgen output:\n{text[-1500:]}")
    return int(el.group(1)) + int(el.group(2)) / 1e6


@contextlib.contextmanager
def filter_on(rig: FloodRig, mode: str):
    """The filter of `mode` on the receiving veth; yields (reader of its drop counter, what
    is attached)."""
    ns, ifname = rig.receiver, rig.ifname
    if mode == "none":
        yield (lambda: 0), "nothing"
    elif mode == "bare XDP_DROP":
        B.sh(["ip", "netns", "exec", ns, "bpftool", "net", "attach", "xdpdrv", "id",
              str(rig.bare.id), "dev", ifname], "attaching the bare program")
        try:
            yield (lambda: 0), f"xdp_drop.c, native (prog {rig.bare.id})"
        finally:
            B.sh(["ip", "netns", "exec", ns, "bpftool", "net", "detach", "xdpdrv", "dev",
                  ifname], "detaching the bare program", check=False)
    elif mode == "xdpfw":
        r = rig.daemon.api.post("/api/v1/interfaces", json_body={"name": ifname, "netns": ns},
                                ok=(201,))
        try:
            yield (lambda: rig.daemon.iface_counters(ifname, ns)["dropped"]), \
                f"xdpfw, mode {r['mode']} (in use: {r['mode_in_use']})"
        finally:
            rig.daemon.api.delete(f"/api/v1/interfaces/{ifname}?netns={ns}")
    elif mode == "nftables":
        B.sh(["ip", "netns", "exec", ns, "nft", "-f", str(rig.nft)], "loading nftables")
        try:
            yield (lambda: nft_counter(ns)), "nftables netdev ingress, interval set"
        finally:
            B.sh(["ip", "netns", "exec", ns, "nft", "delete", "table", "netdev", NFT_TABLE],
                 "removing the nft table", check=False)
    else:
        raise ValueError(mode)


def flood_once(rig: FloodRig, mode: str, count: int, retries: list[dict], rnd: int) -> dict:
    """One trafgen run through the filter of `mode`. A trafgen error is retried once (and
    recorded); a second one is returned as the run's error, never raised."""
    with filter_on(rig, mode) as (drops, what):
        for attempt in (1, 2):
            rx0 = B.rx_packets(rig.receiver, rig.ifname)
            in0, d0 = B.ip_in_receives(rig.receiver), drops()
            try:
                seconds = run_trafgen(rig, count)
            except B.BenchError as e:
                retries.append({"mode": mode, "round": rnd, "attempt": attempt,
                                "error": str(e)[-800:]})
                log(f"flood: {mode}: trafgen failed (attempt {attempt}): "
                    f"{str(e).splitlines()[-1][:200]}")
                settle(lambda: B.rx_packets(rig.receiver, rig.ifname))
                if attempt == 2:
                    return {"mode": mode, "round": rnd, "error": str(e)[-800:], "filter": what}
                continue
            rx = settle(lambda: B.rx_packets(rig.receiver, rig.ifname)) - rx0
            delivered = B.ip_in_receives(rig.receiver) - in0
            dropped = drops() - d0 if mode != "bare XDP_DROP" else rx - delivered
            return {"mode": mode, "round": rnd, "sent": count, "seconds": seconds,
                    "received": rx, "delivered": delivered, "dropped": dropped,
                    "filter": what, "attempt": attempt}
    raise AssertionError("unreachable")


def phase_flood(ctx: Ctx, stack: contextlib.ExitStack) -> dict:
    exact = B.v4_exact(ctx.args.exact_size, SEED + 1)
    blocked = [((198 << 24) | (18 << 16) | (i << 8)) << 8 | 24 for i in range(256)]
    text = B.v4_text(exact + blocked)
    n = len(exact) + len(blocked)
    sender = B.netns_add(ctx.scratch, "fs")
    stack.callback(_drop_netns, ctx.scratch, sender)
    receiver = B.netns_add(ctx.scratch, "fr")
    stack.callback(_drop_netns, ctx.scratch, receiver)
    B.veth(sender, "xbs0", receiver, "xbr0", f"{FLOOD_SENDER}/30", f"{FLOOD_RECEIVER}/30")
    d = start_daemon(ctx, stack, "flood")
    bulk_load(d, text, n, "flood")
    bare = ref_prog(stack, "xdp_drop")
    rig = FloodRig(sender, receiver, ctx.scratch.tmp / "flood.trafgen",
                   ctx.scratch.tmp / "flood.nft", d, bare)
    mac = B.link_json(receiver, "xbr0")["address"]
    rig.cfg.write_text(TRAFGEN_CFG.format(
        dmac=", ".join(f"0x{b}" for b in mac.split(":")), dst=FLOOD_RECEIVER,
        dst_bytes=", ".join(FLOOD_RECEIVER.split("."))))
    rig.nft.write_text(nft_ruleset(text, "xbr0"))
    count, rounds = ctx.args.flood_packets, ctx.args.flood_rounds
    runs: list[dict] = []
    retries: list[dict] = []
    for rnd in range(1, rounds + 1):
        for mode in FLOOD_MODES:
            log(f"flood: {mode}, {count:,} packets (round {rnd} of {rounds})")
            runs.append(flood_once(rig, mode, count, retries, rnd))
    ok = [r for r in runs if "error" not in r]
    rate = {}
    for m in FLOOD_MODES:
        rs = [r["dropped"] / r["seconds"] for r in ok if r["mode"] == m]
        rate[m] = statistics.median(rs) if rs else None
    targets = []
    fw, bare_r, nft = rate["xdpfw"], rate["bare XDP_DROP"], rate["nftables"]
    if fw and bare_r:
        targets.append(ratio_target("flood.vs_bare", "veth flood drop rate vs bare XDP_DROP",
                                    fw / 1e6, bare_r / 1e6, "bare XDP_DROP", ">=", 0.8, "Mpps"))
    if fw and nft:
        targets.append(ratio_target("flood.vs_nft", "veth flood drop rate vs nftables",
                                    fw / 1e6, nft / 1e6, "nftables", ">=", 1.0, "Mpps"))
    fw_runs = [r for r in ok if r["mode"] == "xdpfw"]
    leaked = sum(r["delivered"] for r in fw_runs)
    none_delivered = sum(r["delivered"] for r in ok if r["mode"] == "none")
    none_sent = sum(r["sent"] for r in ok if r["mode"] == "none")
    targets.append(abs_target("flood.leaked", "blocked packets delivered under xdpfw (of "
                              f"{sum(r['sent'] for r in fw_runs):,})", leaked, "packets", "<=",
                              0, none_delivered, "delivered with no filter"))
    missing = [m for m in ("xdpfw", "bare XDP_DROP", "nftables") if not rate[m]]
    if missing:
        raise B.BenchError(f"no successful flood run for {missing}: {retries[-2:]}")
    return {
        "config": {"daemon": d.command, "attach": "POST /api/v1/interfaces with the default "
                   "mode (auto: native on a veth)", "rules": n,
                   "rule_set": f"{len(exact):,} exact addresses + the 256 /24s of "
                   f"{FLOOD_SOURCES}", "sample_rate": sample_rate(d),
                   "trafgen": f"`trafgen --dev xbs0 --num {count} --cpus 1 --no-sock-mem -Q` "
                   f"in {sender}, 60-byte UDP from 198.18.<rnd>.<rnd> to {FLOOD_RECEIVER}",
                   "rounds": rounds},
        "rows": [], "targets": targets,
        "info": {"runs": runs, "trafgen_retries": retries,
                 "rate_pps": rate, "none_delivered_of_sent": [none_delivered, none_sent]},
        "checks": [f"with no filter {none_delivered:,} of {none_sent:,} frames reached the "
                   "receiver's IP stack (the rig delivers); under xdpfw "
                   f"{leaked:,} did"],
    }


# -- the runner --------------------------------------------------------------------------------


def units(args: argparse.Namespace) -> list[tuple[str, str, Callable, tuple]]:
    """(unit name, phase, function, extra args) in run order."""
    table = {
        "calib": [("calib", "calib", phase_calib, ())],
        "exact": [("exact", "exact", phase_exact, ())],
        "v4": [(f"v4@{short_n(n)}", "v4", phase_v4, (n,)) for n in sorted(args.sizes)],
        "v6": [("v6", "v6", phase_v6, ())],
        "load": [(f"load@{short_n(max(args.sizes))}", "load", phase_load, ())],
        "lb": [("lb", "lb", phase_lb, ())],
        "sampling": [("sampling", "sampling", phase_sampling, ())],
        "flood": [("flood", "flood", phase_flood, ())],
    }
    return [u for p in PHASES if p in args.phases for u in table[p]]


def run_unit(ctx: Ctx, rec: B.Recorder, run_id: str, name: str, phase: str, fn: Callable,
             extra: tuple) -> dict:
    for attempt in (1, 2):
        log(f"== {name} (attempt {attempt})")
        r: dict = {"type": "unit", "run": run_id, "unit": name, "phase": phase,
                   "attempt": attempt, "started": _now(), "loadavg_before": os.getloadavg()}
        t0 = time.monotonic()
        try:
            with contextlib.ExitStack() as stack:
                result = fn(ctx, stack, *extra)
            r.update(status="ok", result=result)
        except KeyboardInterrupt:
            r.update(status="interrupted", seconds=time.monotonic() - t0)
            rec.write(r)
            raise
        except Exception as e:  # recorded, retried once, reported
            r.update(status="failed", error=f"{type(e).__name__}: {e}",
                     traceback=traceback.format_exc()[-4000:])
            log(f"{name} failed: {type(e).__name__}: {str(e)[:300]}")
        r["seconds"] = time.monotonic() - t0
        r["loadavg_after"] = os.getloadavg()
        rec.write(r)
        if r["status"] == "ok":
            return r
    return r


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _first_line(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    lines = [ln.strip() for ln in (out.stdout + out.stderr).splitlines() if ln.strip()]
    return lines[0] if lines else ""


def host_info() -> dict:
    model = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem_kb = int(f.readline().split()[1])
    osname = "Linux"
    with contextlib.suppress(OSError), open("/etc/os-release") as f:
        for line in f:
            if line.startswith("PRETTY_NAME="):
                osname = line.split("=", 1)[1].strip().strip('"')
    return {
        "code": _first_line(["git", "-C", str(ROOT), "describe", "--always", "--dirty"]),
        "branch": _first_line(["git", "-C", str(ROOT), "rev-parse", "--abbrev-ref", "HEAD"]),
        "cpus": os.cpu_count(), "cpu_model": model, "ram_gib": round(mem_kb / 2**20, 1),
        "kernel": f"{platform.release()} ({platform.machine()})", "os": osname,
        "tools": {"bpftool": _first_line(["bpftool", "version"]),
                  "trafgen": _first_line(["trafgen", "-v"]),
                  "nft": _first_line(["nft", "--version"]),
                  "xdp-tools": xdp_filter_version()},
    }


def parse_size(s: str) -> int:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([kKmM]?)", s.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {s!r} (e.g. 1000, 100k, 2M)")
    mult = {"": 1, "k": 1_000, "m": 1_000_000}[m.group(2).lower()]
    return int(float(m.group(1)) * mult)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--phases", default=",".join(PHASES),
                   help=f"comma-separated, from {','.join(PHASES)} (default all)")
    p.add_argument("--sizes", default="1k,100k,1M,2M",
                   help="IPv4 prefix counts of the v4 phase; the load phase uses the largest")
    p.add_argument("--exact-size", type=parse_size, default=10_000,
                   help="exact addresses of the exact and flood phases (xdp-filter holds "
                   "10,000 at most)")
    p.add_argument("--v6-size", type=parse_size, default=100_000)
    p.add_argument("--sampling-size", type=parse_size, default=100_000)
    p.add_argument("--single-adds", type=int, default=500)
    p.add_argument("--runs", type=int, default=7, help="bpftool prog run calls per case")
    p.add_argument("--repeat", type=int, default=1_000_000, help="runs per call")
    p.add_argument("--cpu", default="last",
                   help="CPU that bpftool runs on (taskset): a number, 'last' or 'none'")
    p.add_argument("--flood-packets", type=int, default=2_000_000)
    p.add_argument("--flood-rounds", type=int, default=3)
    p.add_argument("--budget-min", type=float, default=15,
                   help="start no phase after this many minutes (the rest is reported as "
                   "skipped)")
    p.add_argument("--out", help="JSON-lines file, or a directory for it (default docs/perf/)")
    p.add_argument("--no-write", action="store_true", help="leave docs/perf.md alone")
    p.add_argument("--report", metavar="JSONL",
                   help="run nothing: render the summary of a results file")
    p.add_argument("--keep-tmp", action="store_true", help="keep the temporary directory "
                   "(daemon logs, frames)")
    args = p.parse_args(argv)
    args.phases = [x for x in args.phases.split(",") if x]
    if bad := set(args.phases) - set(PHASES):
        p.error(f"unknown phase(s) {sorted(bad)}; phases: {','.join(PHASES)}")
    args.sizes = [parse_size(x) for x in args.sizes.split(",") if x]
    if not args.sizes:
        p.error("--sizes needs at least one size")
    return args


def pick_cpu(spec: str) -> int | None:
    if spec == "none":
        return None
    n = os.cpu_count() or 1
    if spec == "last":
        return n - 1 if n > 1 else None
    return int(spec)


def preflight() -> None:
    if os.geteuid() != 0:
        sys.exit("bench_fw.py needs root (bpf(), namespaces, XDP)")
    missing = [t for t in ("bpftool", "ip", "xdp-filter", "trafgen", "nft", "taskset")
               if shutil.which(t) is None]
    if missing:
        sys.exit(f"bench_fw.py needs {', '.join(missing)}: run scripts/setup.sh")
    if not os.path.ismount("/sys/fs/bpf"):
        sys.exit("bpffs is not mounted at /sys/fs/bpf: run scripts/setup.sh")


def _sigterm(signum, _frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report:
        records = B.read_records(Path(args.report))
        return _render_and_write(records, Path(args.report), args)
    preflight()
    signal.signal(signal.SIGTERM, _sigterm)
    run_id = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    out = Path(args.out) if args.out else PERF_DIR
    path = out if out.suffix == ".jsonl" else out / f"fw-{run_id}.jsonl"
    rec = B.Recorder(path)
    command = shlex.join([".venv/bin/python", "scripts/bench_fw.py",
                          *(argv if argv is not None else sys.argv[1:])])
    scratch = B.Scratch(keep_tmp=args.keep_tmp)
    ctx = Ctx(args, scratch, pick_cpu(args.cpu), args.runs, args.repeat)
    rec.write({"type": "run", "run": run_id, "started": _now(), "command": command,
               "host": host_info(), "loadavg": os.getloadavg(), "cpu": ctx.cpu,
               "args": {k: v for k, v in vars(args).items()}, "tag": scratch.tag})
    log(f"results: {path} (scratch {scratch.tmp}, names with tag {scratch.tag})")
    t0 = time.monotonic()
    interrupted = False
    try:
        for name, phase, fn, extra in units(args):
            if time.monotonic() - t0 > args.budget_min * 60:
                rec.write({"type": "unit", "run": run_id, "unit": name, "phase": phase,
                           "attempt": 0, "status": "skipped",
                           "error": f"time budget of {args.budget_min} min used up"})
                continue
            run_unit(ctx, rec, run_id, name, phase, fn, extra)
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted: cleaning up")
    finally:
        problems = scratch.cleanup()
        rec.write({"type": "end", "run": run_id, "ended": _now(),
                   "seconds": time.monotonic() - t0, "interrupted": interrupted,
                   "cleanup_problems": problems})
        if problems:
            log(f"cleanup left: {problems}")
    log(f"done in {(time.monotonic() - t0) / 60:.1f} min; results in {path}")
    records = B.read_records(path)
    _render_and_write(records, path, args)
    return 130 if interrupted else 0


def _render_and_write(records: list[dict], path: Path, args: argparse.Namespace) -> int:
    import bench_report

    text = bench_report.render(records, path.relative_to(ROOT) if path.is_relative_to(ROOT)
                               else path)
    print(text)
    if not args.no_write:
        bench_report.write_section(PERF_MD, SECTION, text)
        log(f"wrote the {SECTION!r} section of {PERF_MD.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
