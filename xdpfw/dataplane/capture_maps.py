"""The capture's maps: what a running capture takes (capture_config), what it took and lost
(capture_counters), and the per-packet flag that turns it on (fw_config's `capture`).

The order keeps the program from reading a half-written filter: the filter is written
before the flag is set, and the flag is cleared before a filter is taken back. Packets in
flight meanwhile meet either the old or the new filter, each whole (one map update).
"""

from __future__ import annotations

import struct

from xdpfw.dataplane import abi
from xdpfw.dataplane.fw_config import FwConfig
from xdpfw.dataplane.maps import open_map

_KEY = struct.pack("<I", 0)
OUTCOMES = {abi.CAPTURE_CAPTURED: "captured", abi.CAPTURE_LIMITED: "rate_limited",
            abi.CAPTURE_LOST: "ring_full"}


class CaptureMaps:
    def __init__(self, pin_dir: str, fw_config: FwConfig) -> None:
        self.config = open_map(pin_dir, "capture_config")
        self.counters = open_map(pin_dir, "capture_counters")
        self.fw_config = fw_config

    def start(self, cfg: abi.CaptureCfg) -> None:
        """Capture what `cfg` selects (replacing any filter so far)."""
        self.config.update(_KEY, bytes(cfg))
        self.fw_config.set_capture(True)

    def stop(self) -> None:
        self.fw_config.set_capture(False)

    def totals(self) -> dict[str, tuple[int, int]]:
        """(packets, bytes) per outcome since the pins were made, summed over CPUs."""
        out = {}
        ncpus = self.counters.value_size // 16
        for idx, name in OUTCOMES.items():
            raw = self.counters.lookup(struct.pack("<I", idx))
            vals = struct.unpack(f"<{2 * ncpus}Q", raw) if raw else (0, 0)
            out[name] = (sum(vals[0::2]), sum(vals[1::2]))
        return out

    def close(self) -> None:
        self.config.close()
        self.counters.close()
