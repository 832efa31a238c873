#!/usr/bin/env python3
"""Differential fuzzing for large runs: the real XDP program (BPF_PROG_TEST_RUN) against the
independent model in tests/packet_model.py, on frames from tests/packet_gen.py.

Run as root from anywhere; it loads its own firewall, pinned under /sys/fs/bpf/xdpfw-test-fuzz-*,
and removes the pins when it ends:
    .venv/bin/python scripts/fuzz_differential.py --packets 250000 --seed 7
    .venv/bin/python scripts/fuzz_differential.py --reading NESTED_NONFIRST_IS_FRAG_CHAIN=0
    .venv/bin/python scripts/fuzz_differential.py --explain 0200...   # the model's reading only
Exits 1 when any frame's verdict or reason differs from the model, 2 when the program does not
load. The same harness (tests/differential.py) runs in CI as tests/test_differential.py.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests import packet_model
from tests.conftest import isolated_program_config, remove_pins
from tests.differential import SCENARIOS, Report, run_scenario
from xdpfw.errors import XdpfwError


def explain(frame_hex: str, scenarios) -> None:
    """How the model reads a frame, and its verdict under each scenario."""
    frame = bytes.fromhex(frame_hex)
    print(packet_model.parse(frame))
    for sc in scenarios:
        verdict, reason = packet_model.Model(list(sc.rules), sc.iface).verdict(frame)
        print(f"  {sc.name:24} {verdict} {reason}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--packets", type=int, default=250_000, help="in all, split over scenarios")
    ap.add_argument("--seed", default="1", help="the frames are a function of the seed")
    ap.add_argument("--scenario", action="append", default=[],
                    help="run only this scenario (repeatable); default: all")
    ap.add_argument("--examples", type=int, default=3, help="frames shown per mismatch class")
    ap.add_argument("--reading", action="append", default=[], metavar="KNOB=0|1",
                    help=f"flip a reading the README leaves open: {', '.join(packet_model.KNOBS)}")
    ap.add_argument("--explain", metavar="HEX", help="print the model's reading of one frame")
    args = ap.parse_args(argv)

    scenarios = [s for s in SCENARIOS if not args.scenario or s.name in args.scenario]
    if not scenarios:
        ap.error(f"no such scenario; known: {', '.join(s.name for s in SCENARIOS)}")
    for item in args.reading:
        knob, _, value = item.partition("=")
        if knob not in packet_model.KNOBS or value not in ("0", "1"):
            ap.error(f"--reading {item}: expected one of {', '.join(packet_model.KNOBS)}=0|1")
        setattr(packet_model, knob, value == "1")
    if args.explain:
        explain(args.explain, scenarios)
        return 0
    share, extra = divmod(max(args.packets, len(scenarios)), len(scenarios))

    from xdpfw.service import Firewall  # BCC only once the arguments are good

    cfg = isolated_program_config(f"fuzz-{uuid.uuid4().hex[:8]}")
    total = Report(keep=args.examples)
    fw = None
    with tempfile.TemporaryDirectory(prefix="xdpfw-fuzz-") as state:
        try:
            fw = Firewall(state, cfg)
            start = time.perf_counter()
            for i, sc in enumerate(scenarios):
                t = time.perf_counter()
                report = run_scenario(fw, sc, args.seed, share + (i < extra))
                dt = time.perf_counter() - t
                print(f"{sc.name:24} {report.packets:8} packets {report.packets / dt:8.0f}/s "
                      f"{report.total_mismatches:7} mismatches", flush=True)
                total.merge(report)
            dt = time.perf_counter() - start
        except XdpfwError as e:
            print(f"fuzz_differential: the program did not load: {e}", file=sys.stderr)
            return 2
        finally:
            if fw is not None:
                fw.close()
            remove_pins(cfg.pin_dir)
    print(f"seed {args.seed}: {total.packets / dt:.0f} packets/s over {dt:.1f} s")
    print(total.summary(args.examples))
    return 1 if total.mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
