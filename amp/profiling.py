"""Wall time and peak memory per phase of a prune, for the report and the benchmark."""
from __future__ import annotations

import resource
import time
from contextlib import contextmanager

import torch


def _rss_peak_mb() -> float:
    # ru_maxrss is in KiB on Linux: the process's peak resident memory so far.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class PhaseTimer:
    """Accumulates seconds per named phase; records the CUDA peak within each phase (when on CUDA)
    and the process's peak resident memory at the end of it (CPU peaks cannot be reset, so this is
    the peak up to and including the phase)."""

    def __init__(self, device: str = "cpu"):
        self.cuda = device == "cuda" and torch.cuda.is_available()
        self.phases: dict[str, dict] = {}

    @contextmanager
    def phase(self, name: str):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.cuda:
                torch.cuda.synchronize()
            entry = self.phases.setdefault(name, {"seconds": 0.0})
            entry["seconds"] += time.perf_counter() - start
            entry["peak_rss_mb"] = round(_rss_peak_mb(), 1)
            if self.cuda:
                peak = torch.cuda.max_memory_allocated() / 2**20
                entry["peak_cuda_mb"] = round(max(entry.get("peak_cuda_mb", 0.0), peak), 1)

    def report(self) -> dict:
        return {name: {k: (round(v, 4) if k == "seconds" else v) for k, v in e.items()}
                for name, e in self.phases.items()}
