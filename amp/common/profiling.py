"""Wall time and peak memory per phase of a prune or a recovery, for the reports and the benchmarks.

Host memory: a background thread samples the resident set size (/proc/self/statm) every few milliseconds, so
each phase gets its own peak (the kernel's high-water mark cannot be read per phase without resetting it for the
whole process); the process-wide peak (ru_maxrss) is reported beside it. Device memory: CUDA's own peak counter,
reset at the start of every phase.
"""
from __future__ import annotations

import os
import resource
import threading
import time
from contextlib import contextmanager

import torch

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:
        return 0


def rss_peak_mb() -> float:
    # ru_maxrss is in KiB on Linux: the process's peak resident memory so far.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class _Sampler(threading.Thread):
    def __init__(self, interval: float = 0.005):
        super().__init__(daemon=True)
        self.interval = interval
        self.peak = rss_bytes()
        self.stopped = threading.Event()

    def run(self):
        while not self.stopped.wait(self.interval):
            self.peak = max(self.peak, rss_bytes())


class PhaseTimer:
    """Accumulates seconds per named phase, with the peak host RSS within it (sampled) and, on CUDA, the peak
    device memory within it."""

    def __init__(self, device: str = "cpu"):
        self.cuda = device == "cuda" and torch.cuda.is_available()
        self.phases: dict[str, dict] = {}

    @contextmanager
    def phase(self, name: str):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        sampler = _Sampler()
        sampler.start()
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.cuda:
                torch.cuda.synchronize()
            sampler.stopped.set()
            sampler.join()
            peak = max(sampler.peak, rss_bytes()) / 2**20
            entry = self.phases.setdefault(name, {"seconds": 0.0})
            entry["seconds"] += time.perf_counter() - start
            entry["peak_rss_mb"] = round(max(entry.get("peak_rss_mb", 0.0), peak), 1)
            if self.cuda:
                cuda_peak = torch.cuda.max_memory_allocated() / 2**20
                entry["peak_cuda_mb"] = round(max(entry.get("peak_cuda_mb", 0.0), cuda_peak), 1)

    def report(self) -> dict:
        return {name: {k: (round(v, 4) if k == "seconds" else v) for k, v in e.items()}
                for name, e in self.phases.items()}
