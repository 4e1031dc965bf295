"""Peak memory of a phase: CUDA peak allocated, or the CPU peak resident set size."""
from __future__ import annotations

import contextlib
import ctypes
import gc
import re
import resource
import sys
from pathlib import Path

import torch


def _read_status_kb(field: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` (Linux), or None."""
    try:
        match = re.search(rf"{field}:\s+(\d+)\s+kB", Path("/proc/self/status").read_text())
    except OSError:
        return None
    return int(match.group(1)) if match else None


class PeakMemory:
    """Peak memory of a phase: CUDA peak allocated, or the CPU peak resident set size.

    ``scope`` says what was measured: ``cuda_max_allocated``, ``rss_since_reset`` (Linux
    VmHWM after a reset through ``/proc/self/clear_refs``) or ``rss_whole_process``
    (``ru_maxrss``: the process's peak, not resettable).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        if device.type == "cuda":
            self.scope = "cuda_max_allocated"
        else:
            self.scope = "rss_since_reset" if self._reset_rss() else "rss_whole_process"

    @staticmethod
    def _reset_rss() -> bool:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # return freed heap pages first
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        except OSError:
            return False
        return _read_status_kb("VmHWM") is not None

    def reset(self) -> None:
        """Start a phase: the next ``peak_mb`` counts from here."""
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.scope == "rss_since_reset":
            self._reset_rss()

    def current_mb(self) -> float | None:
        """Memory in use now (CUDA allocated / CPU resident): the floor of the next peak."""
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device) / 2**20
        rss = _read_status_kb("VmRSS")
        return rss / 1024.0 if rss is not None else None

    def peak_mb(self) -> float:
        """The peak since the last ``reset`` (``rss_whole_process``: since the process began)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        if self.scope == "rss_since_reset":
            return _read_status_kb("VmHWM") / 1024.0
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return maxrss / (2**20 if sys.platform == "darwin" else 1024.0)
