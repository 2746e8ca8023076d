"""What a run costs the machine, measured around a block of code.

"Memory" elsewhere in the package is the kNN memory bank; the peak here is RAM.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch


class PeakRAM:
    """Peak RAM of the block in MiB (``peak_mb``): CUDA's peak allocation on a GPU, the
    process's peak resident set size (VmHWM) on the CPU.

    On Linux, writing 5 to /proc/self/clear_refs resets VmHWM, so each block gets its own peak;
    where that is not possible the peak is the process's since it started.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_mb = float("nan")

    @staticmethod
    def resident_peak_kb() -> Optional[int]:
        """VmHWM of this process in KiB, or None where /proc is not readable."""
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
        except OSError:
            return None
        return None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")
            except OSError:
                pass
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            kb = self.resident_peak_kb()
            self.peak_mb = kb / 1024 if kb is not None else float("nan")
        return False
