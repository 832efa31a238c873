"""The real program against the independent model (tests/packet_model.py), on adversarial
frames from tests/packet_gen.py: every verdict and every reason must agree.

XDPFW_DIFF_SEED picks another seed (the frames are a function of it); large runs go through
scripts/fuzz_differential.py.
"""

from __future__ import annotations

import os

import pytest

from tests.differential import SCENARIOS, run_scenario

pytestmark = pytest.mark.bpf

SEED = int(os.environ.get("XDPFW_DIFF_SEED", "20261130"))
PACKETS_PER_SCENARIO = 2_000  # 22,000 over the 11 scenarios


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_program_agrees_with_model(fw, scenario):
    report = run_scenario(fw, scenario, SEED, PACKETS_PER_SCENARIO)
    assert report.packets == PACKETS_PER_SCENARIO
    if report.mismatches:
        pytest.fail(f"scenario {scenario.name}, seed {SEED}, rules "
                    f"{[str(r) for r in scenario.rules]}, {scenario.iface}:\n{report.summary()}",
                    pytrace=False)
