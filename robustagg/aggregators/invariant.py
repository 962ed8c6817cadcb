"""The Invariant Aggregator (seed defense)."""
from __future__ import annotations

import math
from dataclasses import dataclass

from .. import ops
from .base import Aggregator, Clients, Report, check_bool, check_choice, check_float, check_int


@dataclass
class InvariantReport(Report):
    mask_density: float = 0.0   # fraction of coordinates whose sign agreement passed tau
    lo: int = 0                 # kept sorted ranks lo..hi-1 of the trimmed mean
    hi: int = 0


class InvariantAggregator(Aggregator):
    r"""Invariant Aggregator (Wang et al., AISTATS 2024; ``ops.invariant``): an AND-mask on sign agreement
    times a coordinate-wise trimmed mean,
    $\mathrm{out}_j = [\,|\sum_i \operatorname{sign}(g_{ij})|/n > \tau\,]\cdot \mathrm{TM}_j$.

    The paper trims ``trim = ceil(alpha * n)`` from each side (Table 3: alpha = 0.25,
    tau in {0.2, 0.6}); give ``alpha`` or ``trim``. ``strict=False`` compares with ``>=``.
    The authors' released code differs (tau = 0.6 with ``>=``, and a narrow trimmed mean of
    ranks int(0.45n)..int(0.55n)-1): use ``InvariantAggregator.official()``. Ignores weights.
    """

    default_buffers = "rule"   # robust per coordinate, every client kept

    def __init__(self, tau: float, alpha: float | None = 0.25, trim: int | None = None, strict: bool = True,
                 *, ranks: str = "trim", **kw):
        super().__init__(**kw)
        self.tau = check_float(self.name, "tau", tau, 0.0, 1.0)
        if trim is not None:
            alpha = None
        if alpha is None and trim is None and ranks == "trim":
            raise ValueError(f"{self.name}: give alpha (trim = ceil(alpha*n)) or trim (a count)")
        self.alpha = None if alpha is None else check_float(self.name, "alpha", alpha, 0.0, 0.5)
        self.trim = None if trim is None else check_int(self.name, "trim", trim, 0)
        self.strict = check_bool(self.name, "strict", strict)
        self.ranks = check_choice(self.name, "ranks", ranks, ("trim", "official"))

    @classmethod
    def official(cls, **kw) -> "InvariantAggregator":
        """The authors' released code: tau = 0.6 with ``>=``, kept ranks int(0.45n)..int(0.55n)-1."""
        return cls(0.6, alpha=None, strict=False, ranks="official", **kw)

    def kept_ranks(self, n: int) -> tuple[int, int]:
        """Sorted ranks lo..hi-1 that the trimmed mean keeps for n clients."""
        if self.ranks == "official":
            lo, hi = int(0.45 * n), int(0.55 * n)
            if hi <= lo:
                raise ValueError(f"{self.name}.official(): the kept ranks int(0.45n)..int(0.55n)-1 = {lo}..{hi - 1} "
                                 f"are empty for n={n} clients; it needs an even n or n >= 10")
            return lo, hi
        trim = self.trim if self.trim is not None else math.ceil(self.alpha * n)
        if n - 2 * trim < 1:
            given = f"trim={trim}" if self.alpha is None else f"alpha={self.alpha} (trim=ceil(alpha*n)={trim})"
            raise ValueError(f"{self.name}: {given} leaves nothing for n={n} clients; "
                             f"trim must be in [0, {(n - 1) // 2}]")
        return trim, n - trim

    def check_n(self, n):
        self.kept_ranks(n)

    def aggregate(self, rows: Clients, layout):
        out, mask = rows.run(ops.invariant_ranks, self.tau, lambda r: self.kept_ranks(r.n)[0],
                             lambda r: self.kept_ranks(r.n)[1], self.strict, return_mask=True)
        lo, hi = self.kept_ranks(rows.n)
        density = rows.fraction(mask)
        return out, InvariantReport(selected=rows.all_ids(), mask_density=density, lo=lo, hi=hi)
