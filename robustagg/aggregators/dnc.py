"""Divide-and-Conquer (Shejwalkar & Houmansadr 2021)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..reference import power_of_two_exponents
from .base import Aggregator, Clients, Report, check_float, check_int, make_generator, ranking_key


def sample_columns(d: int, b: int, generator: torch.Generator) -> torch.Tensor:
    """b distinct columns of d, uniformly at random, ascending (all d columns when b >= d).

    A randperm of d costs O(d) (0.1 s at d = 1e7, a good part of a pass over G); for b << d the
    distinct values of iid draws are a uniform random set of their size, so topping them up and
    taking a random b of them is uniform too, in O(b).
    """
    if b >= d:
        return torch.arange(d)
    if 4 * b > d:
        return torch.randperm(d, generator=generator)[:b].sort().values
    picked = torch.unique(torch.randint(0, d, (b + b // 4,), generator=generator))
    while picked.numel() < b:
        picked = torch.unique(torch.cat([picked, torch.randint(0, d, (b,), generator=generator)]))
    return picked[torch.randperm(picked.numel(), generator=generator)[:b]].sort().values


@dataclass
class DnCReport(Report):
    scores: list[dict[int, float]] = field(default_factory=list)   # per iteration: client -> outlier score


class DnC(Aggregator):
    r"""Divide-and-Conquer (Shejwalkar & Houmansadr, NDSS 2021).

    ``niters`` times: sample ``subsample_dim`` coordinates without replacement (from
    ``generator``/``seed``), center the sampled submatrix, take its top right singular vector v,
    score each client by $((g_i - \mu) \cdot v)^2$ and keep the ``n - int(c*f)`` lowest (ties to
    the lower index). The output is the mean of the clients kept in every iteration.

    The sampled n x subsample_dim submatrix is small; the top singular direction comes from the
    eigendecomposition of its n x n Gram matrix, in torch (float64). Ignores weights.
    """

    def __init__(self, f: int, niters: int = 1, subsample_dim: int = 10000, c: float = 1.0, *,
                 generator=None, seed=None, **kw):
        super().__init__(**kw)
        self.f = check_int(self.name, "f", f, 0)
        self.niters = check_int(self.name, "niters", niters, 1)
        self.subsample_dim = check_int(self.name, "subsample_dim", subsample_dim, 1)
        self.c = check_float(self.name, "c", c, 0.0)
        self.generator = make_generator(generator, seed)

    def kept_count(self, n: int) -> int:
        return n - int(self.c * self.f)

    def check_n(self, n):
        if self.kept_count(n) < 1:
            raise ValueError(f"{self.name}: c*f = {self.c}*{self.f} removes {int(self.c * self.f)} of n={n} clients; "
                             f"int(c*f) must be in [0, {n - 1}]")

    def sample(self, rows: Clients) -> torch.Tensor:
        """The sampled columns of the finite rows (float64, CPU); rows non-finite there are dropped."""
        X = rows.local(rows.sampled_columns(sample_columns(rows.d, self.subsample_dim, self.generator)))
        bad = ~torch.isfinite(X).all(dim=1)
        if bool(bad.any()) and rows.policy != "propagate":
            kept = rows.drop(bad)
            X = X[kept.cpu()]
        return X

    def aggregate(self, rows: Clients, layout):
        good = None
        report = DnCReport()
        for _ in range(self.niters):
            X = self.sample(rows)
            if good is not None and good.shape[0] != rows.n:
                good = good[torch.searchsorted(previous, rows.index)]
            self.check_n(rows.n)
            # One power of two for the whole sample scales every score alike (the ranking is the
            # same) and keeps the mean and the Gram matrix of a float64 client of 1e300 in range.
            k = power_of_two_exponents(X.reshape(1, -1))
            scaled = torch.ldexp(X, k)
            centered = scaled - scaled.mean(dim=0)
            # (centered @ v)^2 for the top right singular vector v equals lambda * u^2 for the top
            # eigenpair of the n x n Gram matrix (centered = U S V^T): no SVD of the n x b sample.
            eigenvalues, eigenvectors = torch.linalg.eigh(centered @ centered.T)
            scores = eigenvalues[-1].clamp_min(0) * eigenvectors[:, -1] ** 2
            kept = torch.zeros(rows.n, dtype=torch.bool)
            kept[torch.sort(ranking_key(scores), stable=True).indices[: self.kept_count(rows.n)]] = True
            good = kept if good is None else good & kept
            previous = rows.index
            report.scores.append(dict(zip(rows.all_ids(), torch.ldexp(scores, -2 * k).tolist())))
        if not bool(good.any()):
            report.selected = []
            return torch.zeros(rows.G.shape[1], dtype=rows.G.dtype, device=rows.G.device), report
        chosen = rows.ids(good)
        out = rows.weighted_mean(good.double())   # may drop rows non-finite outside the samples
        rejected = set(rows.rejected)
        report.selected = [i for i in chosen if i not in rejected]
        return out, report
