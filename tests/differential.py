"""The differential harness: the real XDP program (BPF_PROG_TEST_RUN) against the model.

For each scenario it installs the rules through the real Firewall, sets the interface config
of ifindex 1 (where BPF_PROG_TEST_RUN packets arrive), runs generated frames one at a time and
compares the verdict with tests/packet_model.py. The reason the program gave is the one
reason counter that moved: reason_counters is read after every packet (one batch lookup).

Shared by tests/test_differential.py (CI size) and scripts/fuzz_differential.py (large runs).
"""

from __future__ import annotations

import struct
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from tests.conftest import TEST_SLOT
from tests.packet_gen import SCENARIOS, PacketGen, Scenario
from tests.packet_model import Model
from xdpfw.dataplane import abi
from xdpfw.dataplane.testrun import test_run
from xdpfw.rules.model import Action, Proto, parse_prefix
from xdpfw.service import RuleSpec

Outcome = tuple[str, str]  # (verdict, reason)
Class = tuple[Outcome, Outcome]  # (expected, got)

__all__ = ["SCENARIOS", "Report", "run_scenario", "scenario_installed"]


@dataclass
class Example:
    scenario: str
    shape: str
    frame: bytes


@dataclass
class Report:
    packets: int = 0
    mismatches: Counter[Class] = field(default_factory=Counter)
    shapes: defaultdict[Class, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    examples: defaultdict[Class, list[Example]] = field(default_factory=lambda: defaultdict(list))
    keep: int = 3  # examples kept per class

    def add(self, expected: Outcome, got: Outcome, ex: Example) -> None:
        self.packets += 1
        if expected == got:
            return
        cls = (expected, got)
        self.mismatches[cls] += 1
        self.shapes[cls][ex.shape.split("+")[0]] += 1
        if len(self.examples[cls]) < self.keep:
            self.examples[cls].append(ex)

    def merge(self, other: Report) -> None:
        self.packets += other.packets
        self.mismatches.update(other.mismatches)
        for cls, shapes in other.shapes.items():
            self.shapes[cls].update(shapes)
        for cls, exs in other.examples.items():
            self.examples[cls].extend(exs[: self.keep - len(self.examples[cls])])

    @property
    def total_mismatches(self) -> int:
        return sum(self.mismatches.values())

    def summary(self, examples: int = 3) -> str:
        lines = [f"{self.packets} packets, {self.total_mismatches} mismatches "
                 f"in {len(self.mismatches)} classes"]
        for cls, n in self.mismatches.most_common():
            (ev, er), (gv, gr) = cls
            top = ", ".join(f"{s} {c}" for s, c in self.shapes[cls].most_common(4))
            lines.append(f"- expected {ev}/{er}, got {gv}/{gr}: {n}  (shapes: {top})")
            for ex in self.examples[cls][:examples]:
                lines.append(f"    [{ex.scenario}] {ex.shape}: {ex.frame.hex()}")
        return "\n".join(lines)


class ReasonCounters:
    """Which reason a packet was counted under: the reason_counters slot that moved."""

    def __init__(self, fw) -> None:
        self.handle = fw.maps.reason_counters
        self.ncpus = fw.maps.ncpus
        self._stride = self.handle.value_size  # ncpus x struct counter {packets, bytes}
        self._packets = struct.Struct(f"<{2 * self.ncpus}Q")
        self.last = self.read()

    def read(self) -> list[int]:
        keys, values = self.handle.dump()
        out = []
        for i in range(len(keys) // 4):
            vals = self._packets.unpack_from(values, i * self._stride)
            out.append(sum(vals[0::2]))
        return out

    def moved(self) -> str:
        now = self.read()
        moved = [i for i, (a, b) in enumerate(zip(self.last, now, strict=True)) if a != b]
        self.last = now
        if not moved:
            return "none"
        # Names come from the ABI mirror, never hard-coded indices: reasons get added.
        return "+".join(abi.REASON_NAMES.get(i, f"reason#{i}") for i in moved)


def _spec(rule) -> RuleSpec:
    proto = Proto(rule.proto) if rule.proto else None
    return RuleSpec(parse_prefix(rule.prefix), Action(rule.action), proto, rule.dport)


@contextmanager
def scenario_installed(fw, scenario: Scenario) -> Iterator[None]:
    """The scenario's rules and interface config, removed again afterwards."""
    rules = fw.add_rules([_spec(r) for r in scenario.rules]) if scenario.rules else []
    iface = scenario.iface
    policy = abi.POLICY_DROP if iface.policy == "drop" else abi.POLICY_PASS
    unparsed = abi.POLICY_DROP if iface.unparsed_policy == "drop" else abi.POLICY_PASS
    fw.maps.set_policy(TEST_SLOT, policy, unparsed, abi.IFF_GUARD_L2 if iface.guard_l2 else 0)
    try:
        yield
    finally:
        for rule in rules:
            fw.delete_rule(rule.id)
        fw.maps.clear_policy(TEST_SLOT)


def run_scenario(fw, scenario: Scenario, seed: int | str, packets: int) -> Report:
    """Run `packets` generated frames through the program under `scenario`."""
    report = Report()
    model = Model(list(scenario.rules), scenario.iface)
    gen = PacketGen(seed, scenario)
    with scenario_installed(fw, scenario):
        counters = ReasonCounters(fw)
        fd = fw.program.fd
        for shape, frame in gen.frames(packets):
            expected = model.verdict(frame)
            verdict = test_run(fd, frame).verdict
            report.add(expected, (verdict, counters.moved()), Example(scenario.name, shape, frame))
    return report
