"""Timing and memory-floor measurement for the benchmark (docs/backends.md, "Benchmark").

CPU: wall-clock times after a warm-up call. GPU: CUDA events, with the L2 cache flushed (a 256 MB
write) before every repeat. Every measurement keeps its spread (min, median, max), so that a busy
machine shows up as noise instead of as a result.

The floor is the fastest plain read of G this machine does, measured right before each case:
the better of ``G.sum()`` and our streaming read kernel (``torch.ops.robustagg_bench.stream_read``,
csrc/cpu/stream_read.cpp) on CPU, of ``G.sum()`` and a device-to-device copy on GPU. An op that
writes a new matrix (clip_rows, maxpool_amplify) has those bytes at the rate of ``G.clone()``
instead. No op that moves the same bytes can beat it, so "% of floor" stays at or below 100%
unless the floor measurement itself was disturbed, and such rows are flagged.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

_L2_FLUSH_BYTES = 256 << 20
_CLONE_SAMPLE_BYTES = 256 << 20
# A floor whose bandwidth is below this fraction of the best seen in the run was measured while
# something else ran; the rows it would scale are flagged instead of printed as results.
PLAUSIBLE_FLOOR_FRACTION = 0.2
# Calls whose slowest and fastest differ by more than this factor are flagged as noisy.
NOISY_SPREAD = 1.5


@dataclass(frozen=True)
class Timing:
    """Seconds of the timed calls of one thunk."""
    median: float
    min: float
    max: float
    calls: int   # timed calls; 1 means the warm-up alone was slower than the budget and is the time

    @property
    def noisy(self) -> bool:
        return self.calls >= 3 and self.max > NOISY_SPREAD * self.min


@dataclass(frozen=True)
class Floor:
    bandwidth: float                # bytes per second of the fastest plain read
    what: str                       # which pass gave it
    plausible: bool                 # False: far below the best bandwidth seen in this run
    clone_bandwidth: float | None   # bytes per second of G.clone(), when the case writes a new matrix

    def seconds(self, bytes_read: int, fresh_bytes: int = 0) -> float:
        """The least time to read ``bytes_read`` bytes, ``fresh_bytes`` of them also written to a
        newly allocated output: those pass at G.clone()'s rate, which pays for the new pages as
        the op must (on a VM that backs them on first touch, several times a read's cost)."""
        if not fresh_bytes:
            return bytes_read / self.bandwidth
        return (bytes_read - fresh_bytes) / self.bandwidth + fresh_bytes / self.clone_bandwidth


class Timer:
    def __init__(self, device: torch.device, repeats: int = 5, budget_s: float = 12.0):
        self.device = device
        self.repeats = repeats
        self.budget_s = budget_s
        self.best_bandwidth = 0.0
        self.floor_passes: set[str] = set()   # the passes that gave a floor in this run
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

    def measure(self, fn, repeats: int | None = None) -> Timing:
        """``fn()`` timed after one warm-up call, up to ``repeats`` times within the time budget.

        A call slower than the whole budget is timed once: its warm-up is the measurement.
        """
        repeats = self.repeats if repeats is None else repeats
        warm = self._once(fn)
        if warm > self.budget_s:
            return Timing(warm, warm, warm, 1)
        count = max(1, min(repeats, int(self.budget_s / max(warm, 1e-9))))
        times = [self._once(fn) for _ in range(count)]
        return Timing(statistics.median(times), min(times), max(times), count)

    def floor(self, G: torch.Tensor, writes: bool = False) -> Floor:
        """The fastest plain read of G's bytes, timed now (fastest of the timed calls); with
        ``writes``, also the rate of a clone, a read plus a write of new memory."""
        nbytes = G.numel() * G.element_size()
        passes = {"G.sum()": (lambda: G.sum(), nbytes)}
        if G.device.type == "cpu" and G.is_contiguous():
            passes["stream_read"] = (lambda: torch.ops.robustagg_bench.stream_read(G), nbytes)
        if G.device.type == "cuda":
            dst = torch.empty_like(G)
            passes["device-to-device copy"] = (lambda: dst.copy_(G), 2 * nbytes)
        rates = {what: moved / self.measure(fn).min for what, (fn, moved) in passes.items()}
        what = max(rates, key=rates.get)
        bandwidth = rates[what]
        self.best_bandwidth = max(self.best_bandwidth, bandwidth)
        self.floor_passes.add(what)
        # the rate of a fresh write, from at most _CLONE_SAMPLE_BYTES of G: a clone of all of a
        # large G would double the memory in use and measure memory pressure instead
        sample = G.reshape(-1)[: max(1, _CLONE_SAMPLE_BYTES // G.element_size())]
        clone = sample.numel() * sample.element_size() / self.measure(sample.clone).min if writes else None
        return Floor(bandwidth, what, bandwidth >= PLAUSIBLE_FLOOR_FRACTION * self.best_bandwidth, clone)


def format_seconds(seconds: float) -> str:
    """Three significant digits in the unit that suits the value: 85.3 us, 12.4 ms, 1.25 s."""
    scale, unit = (1.0, "s") if seconds >= 1 else (1e-3, "ms") if seconds >= 1e-3 else (1e-6, "us")
    value = seconds / scale
    return f"{value:.3g} {unit}" if value < 100 else f"{value:.0f} {unit}"
