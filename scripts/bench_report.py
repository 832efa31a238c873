"""The markdown summary of a scripts/bench_fw.py results file (JSON lines), and the one place
that writes it into docs/perf.md. `bench_fw.py --report FILE` renders a file again.

The summary reads only the records: a run that died half-way still renders what it wrote.
"""

from __future__ import annotations

import re
from pathlib import Path

METHOD = """\
How the figures are made (the same in every run):
- **The daemon** is `.venv/bin/xdpfw serve`, as `scripts/appliance.sh` runs it, with its
  defaults (drop-event sampling 1 in 100, default capacities, policy pass). Only `--socket`,
  `--state-dir` and `--bpffs-dir` point at the run's own paths, so it runs beside tests; the lb
  phase also passes a config file whose only setting is `[lb] netns` (where its backend is).
  Each phase starts a fresh daemon and stops it with `POST /api/v1/shutdown {"detach": true}`.
- **Rules** go in through `POST /api/v1/rules/bulk` as a text/plain blocklist, the interface
  through `POST /api/v1/interfaces` (generic mode, a veth in a namespace of the run's own).
- **Per packet:** `bpftool prog run id ID data_in FRAME repeat R` on the program attached to that
  interface: its id from `ip -j link` must equal `interfaces[].prog_id` of `GET /api/v1/program`,
  every run's verdict is checked, and the daemon's own counters of that interface
  (`GET /api/v1/stats`) must grow by exactly the runs made (IPv6 is off in the namespaces, so
  nothing else reaches the interface). Cases of one table are interleaved, round by round;
  the figure is the median of the rounds, the range in brackets. bpftool runs pinned to one
  CPU with taskset. Baselines are measured in the same rounds: a bare `XDP_DROP`/`XDP_TX`
  (`scripts/bench_progs/xdp_drop.c`, `xdp_tx.c`) and minimal "parse + one LPM lookup" programs
  (`lpm_min.c`, `lpm6_min.c`) holding the same prefixes, loaded with BCC by the runner;
  xdp-filter from Debian's xdp-tools.
- **Frames:** 60-byte IPv4/UDP (64 on the wire), 64-byte IPv6/UDP, 60-byte IPv4/TCP for the LB.
"""


def render(records: list[dict], path) -> str:
    run = next((r for r in records if r.get("type") == "run"), {})
    end = next((r for r in records if r.get("type") == "end"), None)
    units = [r for r in records if r.get("type") == "unit"]
    final: dict[str, dict] = {}
    for u in units:
        final[u["unit"]] = u  # the last attempt decides
    host = run.get("host", {})
    out = [
        "## Firewall (as shipped)",
        "",
        "Produced by `scripts/bench_fw.py`; each phase's result is in the results file as it "
        "was measured, and this section is rendered from it (`--report FILE` renders it again). "
        "Older sections below were made in-process and are kept for their history.",
        "",
        f"    {run.get('command', '(no run record)')}",
        "",
        f"- results: `{path}`",
        f"- run: {run.get('started', '?')}, "
        + (f"{end['seconds'] / 60:.1f} min" + (" (interrupted)" if end.get("interrupted")
                                               else "") if end else "did not finish"),
        f"- code: {host.get('code', '?')} (branch {host.get('branch', '?')})",
        f"- machine: {host.get('cpus', '?')} x {host.get('cpu_model', '?')}, "
        f"{host.get('ram_gib', '?')} GiB, shared with other users; {host.get('kernel', '?')}, "
        f"{host.get('os', '?')}",
        "- tools: " + "; ".join(f"{k} {v}" for k, v in host.get("tools", {}).items()),
        f"- load average at start: {_load(run.get('loadavg'))}; bpftool pinned to CPU "
        f"{run.get('cpu')}",
    ]
    if end and end.get("cleanup_problems"):
        out.append(f"- **cleanup left**: {end['cleanup_problems']}")
    targets = [(name, t) for name, u in final.items() if u["status"] == "ok"
               for t in u["result"].get("targets", [])]
    goals = [t for _, t in targets if t["kind"] != "info"]
    met = sum(bool(t["pass"]) for t in goals)
    bad = [u for u in final.values() if u["status"] != "ok"]
    out += ["", f"### Targets: {met} of {len(goals)} met"
            + (f"; {len(bad)} phase(s) not measured" if bad else ""), "",
            "| target | goal | measured | baseline, same run | ratio | met |",
            "|---|---|---:|---|---:|---|"]
    for _, t in targets:
        out.append(_target_row(t))
    for u in bad:
        out.append(f"| phase `{u['unit']}` | | | | | **{u['status']}**: "
                   f"{_cell(u.get('error', ''))[:200]} |")
    out += _other_bulk_loads(final)
    out += ["", "### Phases", "", "| phase | status | attempts | seconds | load avg before/after |"
            " notes |", "|---|---|---:|---:|---|---|"]
    for name, u in final.items():
        tries = [x for x in units if x["unit"] == name]
        notes = "; ".join(f"attempt {x['attempt']} failed: {_cell(x.get('error', ''))[:240]}"
                          for x in tries if x["status"] == "failed")
        res = u.get("result") or {}
        retries = (res.get("info") or {}).get("trafgen_retries") or []
        if retries:
            notes += ("; " if notes else "") + f"{len(retries)} trafgen error(s) retried: " + \
                _cell(retries[0]["error"].splitlines()[-1])[:160]
        out.append(f"| `{name}` | {u['status']} | {len(tries)} | {u.get('seconds', 0):.0f} | "
                   f"{_load(u.get('loadavg_before'), 1)} / {_load(u.get('loadavg_after'), 1)} "
                   f"| {notes} |")
    try:
        out += _glance(final)
    except (KeyError, TypeError, ValueError) as e:
        out += ["", f"(the at-a-glance table was not rendered: {type(e).__name__} {e})"]
    out += ["", METHOD]
    for name, u in final.items():
        if u["status"] == "ok":
            try:
                out += _unit_section(name, u["result"])
            except (KeyError, TypeError, ValueError) as e:  # a record of an older format
                out += ["", f"### `{name}`", "", f"(not rendered: {type(e).__name__} {e}; "
                        "the record is in the results file)"]
    return "\n".join(out).rstrip() + "\n"


def _other_bulk_loads(final: dict[str, dict]) -> list[str]:
    """The bulk-load target is one measurement; other phases of the run made loads of the same
    size on a fresh daemon too, which shows how much a single figure moves."""
    load = next((u for n, u in final.items() if n.startswith("load@") and u["status"] == "ok"),
                None)
    if load is None:
        return []
    n = load["result"]["config"]["rules"]
    same = [(name, u["result"]["info"]["bulk_load_s"]) for name, u in final.items()
            if u["status"] == "ok" and not name.startswith("load@")
            and u["result"].get("config", {}).get("rules") == n
            and "bulk_load_s" in (u["result"].get("info") or {})]
    if not same:
        return []
    return ["", f"The same {n:,}-prefix bulk load made by other phases of this run (fresh "
            "daemon, same request): " + ", ".join(f"`{k}` {v:.2f} s" for k, v in same) + "."]


GLANCE = ("/32 hit", "/24 hit", "miss", "miss in host /24")


def _glance(final: dict[str, dict]) -> list[str]:
    """The issue's table: ns per packet of the attached program at each N, and x bare."""
    lines = []
    for name, u in final.items():
        if u["status"] != "ok" or not (name.startswith("v4@") or name == "exact"):
            continue
        rows = u["result"]["rows"]
        xdpfw = {r["packet"]: r for r in rows if r["program"].startswith("xdpfw")}
        bare = next((r for r in rows if r["program"].startswith("bare")), None)
        n = u["result"]["config"]["rules"]
        label = f"{n:,} exact" if name == "exact" else f"{n:,}"
        cells = []
        for k in GLANCE:
            r = xdpfw.get(k)
            cells.append(f"{r['ns']['median']:.0f} ({r['ratios']['vs bare']:.1f}x)" if r
                         else "-")
        bare_ns = f"{bare['ns']['median']:.0f}" if bare else "-"
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {bare_ns} |")
    if not lines:
        return []
    return ["", "### Per packet at a glance: xdpfw as attached, ns (x bare XDP_DROP)", "",
            "| IPv4 prefixes | " + " | ".join(GLANCE) + " | bare XDP_DROP |",
            "|---|" + "---:|" * (len(GLANCE) + 1), *lines]


def _load(la, digits: int = 2) -> str:
    return " ".join(f"{x:.{digits}f}" for x in la) if la else "?"


def _cell(s: str) -> str:
    return " ".join(str(s).split()).replace("|", "\\|")


def _num(v: float, unit: str) -> str:
    if unit == "ns":
        return f"{v:.0f} ns"
    if unit == "Mpps":
        return f"{v:.3f} Mpps"
    if unit == "packets":
        return f"{v:,.0f}"
    if unit == "s":
        return f"{v:.2f} s"
    if unit in ("ms", "MiB"):
        return f"{v:.1f} {unit}"
    return f"{v:g} {unit}"


def _target_row(t: dict) -> str:
    if t["kind"] == "ratio":
        goal = f"{t['op']} {t['limit']:.2f}x {t['baseline_what']}"
    elif t["kind"] == "absolute":
        goal = f"{t['op']} {_num(t['limit'], t['unit'])}"
    else:
        goal = "report"
    base = (f"{t['baseline_what']}: {_num(t['baseline'], t['unit'])}"
            if t.get("baseline") is not None else "-")
    ratio = f"{t['ratio']:.2f}x" if t.get("ratio") is not None else "-"
    met = "-" if t["pass"] is None else ("yes" if t["pass"] else "**no**")
    return f"| {t['what']} | {goal} | {_num(t['value'], t['unit'])} | {base} | {ratio} | {met} |"


def _stat(s: dict) -> str:
    return f"{s['median']:.0f} ({s['min']:.0f}-{s['max']:.0f})"


TITLES = {"calib": "Calibration: what the tool adds", "exact": "xdpfw beside xdp-filter",
          "v6": "IPv6", "lb": "Load balancer: conntrack hit", "sampling": "Drop-event sampling",
          "flood": "Flood over veth (trafgen)"}


def _unit_section(name: str, res: dict) -> list[str]:
    base = name.split("@")[0]
    title = TITLES.get(base, "")
    if base == "v4":
        title = f"IPv4, {name.split('@')[1]} prefixes"
    elif base == "load":
        title = f"Loading {name.split('@')[1]} prefixes: time, memory, latency"
    cfg = res.get("config", {})
    out = ["", f"### {title} (`{name}`)"]
    if "daemon" in cfg:
        out += [""]
        out.append(f"Daemon: `{cfg['daemon']}`" + (f", config file `{_cell(cfg['config_file'])}`"
                                                    if cfg.get("config_file") else ""))
    facts = []
    for key in ("rules", "mix", "rule_set", "sample_rate", "default_sample_rate", "attach",
                "frame", "xdp_filter", "trafgen", "client"):
        if key in cfg:
            v = f"{cfg[key]:,}" if isinstance(cfg[key], int) else str(cfg[key])
            facts.append(f"{key.replace('_', ' ')}: {v}")
    if "method" in cfg:
        m = cfg["method"]
        facts.append(f"median of {m['runs']} x repeat {m['repeat']:,}, bpftool on CPU "
                     f"{m['cpu']}" + (f" ({m['note']})" if m.get("note") else ""))
    if facts:
        out += ["", *[f"- {f}" for f in facts]]
    probes = res.get("probes")
    if probes:
        out.append("- sources: " + "; ".join(f"{p['name']} {p['addr']} ({p['why']})"
                                             for p in probes))
    rows = res.get("rows") or []
    if rows:
        ratio_names = list(dict.fromkeys(k for r in rows for k in r["ratios"]))
        out += ["", "| program | packet | verdict | ns/packet | " + " | ".join(ratio_names)
                + " |", "|---|---|---|---:|" + "---:|" * len(ratio_names)]
        for r in rows:
            cells = [f"{r['ratios'][k]:.2f}x" if k in r["ratios"] else "-" for k in ratio_names]
            out.append(f"| {r['program']} | {r['packet']} | {r['verdict']} | {_stat(r['ns'])} "
                       f"| " + " | ".join(cells) + " |")
    info = res.get("info") or {}
    if base == "load":
        out += _load_lines(info)
    elif base == "flood":
        out += _flood_lines(info)
    elif base == "v4" or base in ("exact", "v6"):
        bits = [f"bulk load {info['bulk_load_s']:.2f} s"] if "bulk_load_s" in info else []
        if "xdp_filter_fill_s" in info:
            bits.append(f"xdp-filter map filled in {info['xdp_filter_fill_s']:.2f} s")
        if bits:
            out += ["", "Also: " + "; ".join(bits) + "."]
    elif base == "sampling":
        out += ["", f"The daemon read {info.get('events_read_by_daemon', 0):,} events during "
                "the runs."]
    checks = res.get("checks") or []
    if checks:
        out += ["", "Checks: " + " ".join(c.rstrip(".") + "." for c in checks)]
    return out


def _load_lines(info: dict) -> list[str]:
    mem = info["memory_kib"]
    add, hz, fl = info["single_add_ms"], info["healthz_ms"], info["floor"]
    return [
        "",
        "| measurement | result |",
        "|---|---|",
        f"| bulk load, {info['bulk_bytes'] / 2**20:.1f} MiB text/plain, HTTP included | "
        f"{info['bulk_load_s']:.2f} s |",
        f"| kernel floor, README's layout: {fl['hosts']:,} /32s into a fresh hash + "
        f"{fl['rest']:,} other prefixes into a fresh LPM trie, one BPF_MAP_UPDATE_BATCH each | "
        f"{fl['hash_s']:.2f} + {fl['split_trie_s']:.2f} s |",
        f"| kernel floor, one LPM trie of all {fl['hosts'] + fl['rest']:,} | "
        f"{fl['trie_s']:.2f} s (keys packed in Python beforehand: {fl['pack_s']:.2f} s) |",
        "| daemon VmRSS / VmHWM: idle at start | "
        f"{mem['idle']['VmRSS'] / 1024:.0f} / {mem['idle']['VmHWM'] / 1024:.0f} MiB |",
        "| daemon VmRSS / VmHWM: after the bulk load | "
        f"{mem['after_bulk']['VmRSS'] / 1024:.0f} / {mem['after_bulk']['VmHWM'] / 1024:.0f} MiB |",
        "| daemon VmRSS / VmHWM: at the end | "
        f"{mem['end']['VmRSS'] / 1024:.0f} / {mem['end']['VmHWM'] / 1024:.0f} MiB |",
        f"| single add (POST /api/v1/rules, a /32), p50 / p99 / max of {add['n']} | "
        f"{add['p50']:.1f} / {add['p99']:.1f} / {add['max']:.1f} ms |",
        "| adding a /8, each | " + ", ".join(f"{x:.1f}" for x in info["slash8_ms"]) + " ms |",
        f"| GET /healthz round trip, p50 / p99 | {hz['p50']:.2f} / {hz['p99']:.2f} ms |",
        f"| daemon healthy after start (BCC compile included) | "
        f"{info.get('healthy_after_s') or 0:.1f} s |",
    ]


def _flood_lines(info: dict) -> list[str]:
    runs = [r for r in info["runs"] if "error" not in r]
    modes = list(dict.fromkeys(r["mode"] for r in info["runs"]))
    rate = info["rate_pps"]
    out = ["", "Rates are medians over rounds of packets dropped by the filter (its own counter: "
           "xdpfw's interface `dropped`, nft's `counter`; bare: received - delivered) per second "
           "of trafgen's run. `delivered` is IpInReceives of the receiving namespace. Sender and "
           "filter share the machine's CPUs: the rate is mostly the sender's cost, which dilutes "
           "differences between filters.", "",
           "| filter | attached | runs ok | sent Mpps | received | dropped | delivered | drop Mpps "
           "| vs bare | vs nftables |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for m in modes:
        rs = [r for r in runs if r["mode"] == m]
        n_all = len([r for r in info["runs"] if r["mode"] == m])
        what = next((r["filter"] for r in info["runs"] if r["mode"] == m), "")
        if not rs:
            out.append(f"| {m} | {what} | 0 of {n_all} | | | | | | | |")
            continue
        sent = sorted(r["sent"] / r["seconds"] for r in rs)[len(rs) // 2] / 1e6
        rv = rate.get(m)
        vs = [f"{rv / rate[k]:.2f}x" if m != "none" and rv and rate.get(k) else "-"
              for k in ("bare XDP_DROP", "nftables")]
        out.append(f"| {m} | {what} | {len(rs)} of {n_all} | {sent:.2f} | "
                   f"{sum(r['received'] for r in rs):,} | {sum(r['dropped'] for r in rs):,} | "
                   f"{sum(r['delivered'] for r in rs):,} | "
                   f"{rv / 1e6 if m != 'none' and rv else 0:.3f} | {vs[0]} | {vs[1]} |")
    errs = [r for r in info["runs"] if "error" in r]
    for r in errs:
        out.append(f"\nRun failed twice and is left out: {r['mode']}, round {r['round']}: "
                   f"{_cell(r['error'])[-300:]}")
    return out


def write_section(perf_md: Path, title: str, text: str) -> None:
    """Put the section at the top of perf_md, replacing an older one of the same title (its
    hand-written "### Findings" subsection is kept); every other section stays as it is."""
    old = perf_md.read_text() if perf_md.exists() else "# Performance\n"
    parts = re.split(r"(?m)^(?=## )", old)
    head = parts[0] if parts[0].strip() else "# Performance\n"
    mine = [p for p in parts[1:] if p.splitlines()[0].strip() == title]
    others = [p for p in parts[1:] if p not in mine]
    if mine:
        found = re.search(r"(?ms)^### Findings\b.*?(?=^### |\Z)", mine[0])
        if found:
            text = text.rstrip() + "\n\n" + found.group(0).rstrip() + "\n"
    new = head.rstrip() + "\n\n" + text.rstrip() + "\n"
    if others:
        new += "\n" + "\n".join(p.rstrip() + "\n" for p in others)
    perf_md.write_text(new)
