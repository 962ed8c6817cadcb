"""Timing and memory-floor measurement for the benchmark (docs/backends.md, "Benchmark").

CPU: wall-clock medians after a warm-up call. GPU: CUDA events, with the L2 cache flushed (a
256 MB write) before every repeat. The floor is the bandwidth of a plain pass measured in the same
run: ``G.sum(0)`` (a read) on CPU, a device-to-device copy on GPU.
"""
from __future__ import annotations

import statistics
import time

import torch

_L2_FLUSH_BYTES = 256 << 20


class Timer:
    def __init__(self, device: torch.device, repeats: int = 5, budget_s: float = 12.0):
        self.device = device
        self.repeats = repeats
        self.budget_s = budget_s
        self._flush = torch.empty(_L2_FLUSH_BYTES, dtype=torch.uint8, device=device) if device.type == "cuda" else None

    def _once(self, fn) -> float:
        if self._flush is None:
            start = time.perf_counter()
            fn()
            return time.perf_counter() - start
        self._flush.fill_(1)
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return begin.elapsed_time(end) / 1e3

    def median(self, fn) -> float:
        """Median seconds of ``fn()`` after one warm-up call; fewer repeats for slow calls.

        A call slower than the whole budget is timed once: its warm-up is the measurement.
        """
        warm = self._once(fn)
        if warm > self.budget_s:
            return warm
        repeats = max(1, min(self.repeats, int(self.budget_s / max(warm, 1e-9))))
        return statistics.median(self._once(fn) for _ in range(repeats))

    def bandwidth(self, G: torch.Tensor) -> tuple[float, float, str]:
        """(bytes/s, seconds, what) of the reference pass over G in this run."""
        if G.device.type == "cuda":
            dst = torch.empty_like(G)
            t = self.median(lambda: dst.copy_(G))
            return 2 * G.numel() * G.element_size() / t, t, "device-to-device copy"
        t = self.median(lambda: G.sum(0))
        return G.numel() * G.element_size() / t, t, "G.sum(0) read"
