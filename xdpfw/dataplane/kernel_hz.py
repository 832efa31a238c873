"""The kernel's tick rate (CONFIG_HZ): the load balancer keeps conntrack times in jiffies.

Read from the kernel's own config (/proc/config.gz, or /boot/config-<release>); else measured
against CLOCK_MONOTONIC from /proc/timer_list; else 1000, the fastest common rate, with a
warning: idle flows then re-balance early (never late).
"""

from __future__ import annotations

import functools
import gzip
import logging
import os
import re
import time
from pathlib import Path

log = logging.getLogger(__name__)

RATES = (100, 250, 300, 1000)
_CONFIG_HZ = re.compile(rb"^CONFIG_HZ=(\d+)$", re.M)
_JIFFIES = re.compile(rb"^jiffies: (\d+)$", re.M)


@functools.cache
def kernel_hz() -> int:
    for source in (_proc_config, _boot_config, _measured):
        try:
            hz = source()
        except OSError:
            continue
        if hz:
            return hz
    log.warning("the kernel's HZ is unknown (no /proc/config.gz, no /boot/config, no "
                "/proc/timer_list): assuming 1000; idle LB flows may re-balance early")
    return 1000


def _proc_config() -> int | None:
    with gzip.open("/proc/config.gz") as f:
        m = _CONFIG_HZ.search(f.read())
    return int(m.group(1)) if m else None


def _boot_config() -> int | None:
    m = _CONFIG_HZ.search(Path(f"/boot/config-{os.uname().release}").read_bytes())
    return int(m.group(1)) if m else None


def _measured() -> int | None:
    def sample() -> tuple[int, float] | None:
        m = _JIFFIES.search(Path("/proc/timer_list").read_bytes())
        return (int(m.group(1)), time.monotonic()) if m else None

    first = sample()
    time.sleep(0.2)
    second = sample()
    if not first or not second:
        return None
    rate = (second[0] - first[0]) / (second[1] - first[1])
    return min(RATES, key=lambda r: abs(r - rate))
