#!/usr/bin/env python3
"""Set replace, as shipped: a 1M-entry set replaced by a 1M-entry set that shares half of it.

`xdpfw serve` with its defaults (only --socket, --state-dir and --bpffs-dir are its own),
driven over its unix socket with one kept-alive HTTP/1.1 connection. Two sets of the same
size, A and B, share half their prefixes (random, the mix of scripts/benchlib.py); each
round PUTs the other one to /api/v1/sets/feed, HTTP and parsing included. Baselines, in the
same run, on the same daemon and sizes:
  - load:  the first PUT of A into an empty daemon (every rule added; a bulk load);
  - naive: DELETE /api/v1/sets/feed, then PUT the other set (the only way before sets, and it
           leaves the shared half unguarded in between: netns_tests/test_sets.py).
After each replace the set must hold exactly the PUT one: its size, and GET /api/v1/explain
on one address only in it (drop), one only in the other (pass), and one shared (drop).

    .venv/bin/python scripts/bench_sets.py                 # as root, about a minute
    .venv/bin/python scripts/bench_sets.py --size 200k --rounds 3
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib as B

SEED = 20_240_512


def parse_size(s: str) -> int:
    s = s.lower()
    mult = {"k": 1_000, "m": 1_000_000}.get(s[-1], 1)
    return int(float(s.rstrip("km")) * mult)


def put_set(d: B.Daemon, text: bytes) -> tuple[float, dict]:
    t0 = time.perf_counter()
    r = d.api.put("/api/v1/sets/feed", data=text, ctype="text/plain", ok=(200,))
    return time.perf_counter() - t0, r


def check(d: B.Daemon, size: int, mine: int, theirs: int, shared: int) -> None:
    got = d.api.get("/api/v1/sets/feed")["rules"]
    if got != size:
        raise B.BenchError(f"the set holds {got} rules after the replace, not {size}")
    for addr, want in ((mine, "drop"), (theirs, "pass"), (shared, "drop")):
        e = d.api.get(f"/api/v1/explain?src={B.ip4(addr)}")
        if e["verdict"] != want:
            raise B.BenchError(f"explain {B.ip4(addr)}: {e['verdict']}, expected {want}: {e}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="1M", help="rules in each set (default 1M)")
    p.add_argument("--rounds", type=int, default=5, help="replaces (A->B, B->A, ...)")
    p.add_argument("--out", help="append the result as one JSON line to this file")
    args = p.parse_args(argv)
    n = parse_size(args.size)
    half = n // 2
    B.log(f"generating {n + half:,} random IPv4 prefixes ({B.V4_MIX_TEXT})")
    pool = B.v4_prefixes(n + half, SEED)
    shared, only_a, only_b = pool[:half], pool[half:n], pool[n:]
    text_a = B.v4_text(shared + only_a).encode()
    text_b = B.v4_text(shared + only_b).encode()
    # A probe address in each part: a host of the part that no prefix of the other parts
    # covers, so what explain says of it names the part.
    probe = {}
    for name, part, others in (("a", only_a, shared + only_b), ("b", only_b, shared + only_a),
                               ("shared", shared, only_a + only_b)):
        idx = B.PrefixIndex(others, 32)
        probe[name] = next(q >> 8 for q in part if q & 0xFF == 32 and
                           idx.longest(q >> 8) is None)
    scratch = B.Scratch()
    result: dict = {}
    try:
        with contextlib.ExitStack() as stack:
            d = B.Daemon(scratch, "sets")
            stack.callback(d.stop)
            B.log(f"daemon: {d.command}")
            d.wait_healthy()
            mem_idle = d.memory()
            load_s, r = put_set(d, text_a)
            if r["added"] != n:
                raise B.BenchError(f"the first PUT added {r['added']}, sent {n}")
            check(d, n, probe["a"], probe["b"], probe["shared"])
            B.log(f"load (first PUT of {n:,}): {load_s:.2f} s")
            replace, current = [], "a"
            for i in range(args.rounds):
                nxt = "b" if current == "a" else "a"
                seconds, r = put_set(d, text_b if nxt == "b" else text_a)
                if (r["added"], r["removed"], r["kept"]) != (n - half, n - half, half):
                    raise B.BenchError(f"replace {i}: {r}")
                check(d, n, probe[nxt], probe[current], probe["shared"])
                replace.append(seconds)
                B.log(f"replace {i + 1} ({current} -> {nxt}): {seconds:.2f} s")
                current = nxt
            naive = []
            for i in range(2):
                nxt = "b" if current == "a" else "a"
                t0 = time.perf_counter()
                d.api.delete("/api/v1/sets/feed", ok=(200,))
                put_set(d, text_b if nxt == "b" else text_a)
                naive.append(time.perf_counter() - t0)
                check(d, n, probe[nxt], probe[current], probe["shared"])
                B.log(f"naive {i + 1} (DELETE, PUT): {naive[-1]:.2f} s")
                current = nxt
            mem = d.memory()
            result = {
                "rules": n, "shared": half, "rounds": args.rounds, "daemon": d.command,
                "mix": B.V4_MIX_TEXT, "load_s": load_s, "replace_s": replace,
                "replace_median_s": statistics.median(replace), "naive_s": naive,
                "memory_kib": {"idle": mem_idle, "end": mem},
            }
    finally:
        scratch.cleanup()
    med = result["replace_median_s"]
    print(f"\nSet replace, {n:,} rules by {n:,} sharing {half:,} ({B.V4_MIX_TEXT}), HTTP "
          f"included, over the unix socket\n")
    print("| measurement | result |\n|---|---|")
    print(f"| replace (PUT /api/v1/sets/feed), median of {len(replace)} | {med:.2f} s "
          f"(max {max(replace):.2f} s; target <= 5 s) |")
    print(f"| baseline: first load of {n:,} (PUT into an empty daemon) | {load_s:.2f} s "
          f"(replace / load = {med / load_s:.2f}) |")
    print(f"| baseline: DELETE then PUT, median of {len(naive)} | "
          f"{statistics.median(naive):.2f} s (replace / naive = "
          f"{med / statistics.median(naive):.2f}; unguarded in between) |")
    print(f"| daemon VmRSS / VmHWM at the end | {mem['VmRSS'] / 1024:.0f} / "
          f"{mem['VmHWM'] / 1024:.0f} MiB (idle {mem_idle['VmRSS'] / 1024:.0f}) |")
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(result) + "\n")
    return 0 if med <= 5.0 else 1


if __name__ == "__main__":
    sys.exit(main())
