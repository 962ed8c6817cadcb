"""Distance-based selection: Krum, Multi-Krum (Blanchard et al. 2017), Multi-Krum with cosine
distance, and Bulyan (El Mhamdi et al. 2018)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .. import ops
from .base import Aggregator, Clients, Report, check_int, on_cosine_grid, ranking_key


def krum_scores(D: torch.Tensor, f: int) -> torch.Tensor:
    """Krum's score: for each row, the sum of its n-f-2 smallest distances to the other rows.

    Fewer than one neighbour (Bulyan's last picks) gives every row the score 0.
    """
    n = D.shape[0]
    neighbours = max(n - f - 2, 0)
    others = D + torch.diag(torch.full((n,), float("inf"), dtype=D.dtype))
    return others.sort(dim=1).values[:, :neighbours].sum(dim=1)


def best_first(scores: torch.Tensor) -> torch.Tensor:
    """Indices by ascending score (``ranking_key``); ties go to the lower index (stable sort)."""
    return torch.sort(ranking_key(scores), stable=True).indices


def check_krum_f(owner: str, f, n: int, need: int = 2, extra: int = 3) -> int:
    """f with n >= need*f + extra (Krum: 2f+3, Bulyan: 4f+3)."""
    f = check_int(owner, "f", f, 0)
    if n < need * f + extra:
        raise ValueError(f"{owner}: f={f} is too large for n={n} clients; {owner} needs n >= {need}f+{extra}, "
                         f"so f must be in [0, {max((n - extra) // need, 0)}]"
                         + ("" if n >= extra else f" (and n >= {extra})"))
    return f


@dataclass
class KrumReport(Report):
    scores: dict[int, float] = field(default_factory=dict)   # client -> Krum score (lower is better)


class MultiKrum(Aggregator):
    r"""Multi-Krum (Blanchard et al., NeurIPS 2017): score each update by the sum of its $n-f-2$ smallest
    squared distances to the others, average the ``m`` lowest (ties to the lower index).

    ``m`` defaults to n - f. Requires n >= 2f+3. Ignores weights.
    """

    distance = "sqdist"

    def __init__(self, f: int, m: int | None = None, **kw):
        super().__init__(**kw)
        self.f = check_int(self.name, "f", f, 0)
        self.m = None if m is None else check_int(self.name, "m", m, 1)

    def check_n(self, n):
        check_krum_f(self.name, self.f, n)
        if self.m is not None and self.m > n:
            raise ValueError(f"{self.name}: m={self.m} exceeds n={n} clients; allowed m in [1, {n}]")

    def distances(self, rows: Clients) -> torch.Tensor:
        if self.distance == "cosine":
            return 1 - on_cosine_grid(rows.pairwise(ops.pairwise_cosine).cpu())
        return rows.pairwise(ops.pairwise_sqdist).double().cpu()

    def aggregate(self, rows: Clients, layout):
        D = self.distances(rows)
        self.check_n(rows.n)
        scores = krum_scores(D, self.f)
        m = self.m if self.m is not None else rows.n - self.f
        chosen = best_first(scores)[:m].sort().values
        coef = torch.zeros(rows.n, dtype=torch.float64)
        coef[chosen] = 1.0 / m
        out = rows.combine(coef)
        return out, KrumReport(selected=rows.ids(chosen), scores=dict(zip(rows.all_ids(), scores.tolist())))


class Krum(MultiKrum):
    """Krum (Blanchard et al., NeurIPS 2017): the single update with the lowest score. Requires n >= 2f+3."""

    def __init__(self, f: int, **kw):
        super().__init__(f, m=1, **kw)

    def aggregate(self, rows: Clients, layout):
        D = self.distances(rows)
        self.check_n(rows.n)
        scores = krum_scores(D, self.f)
        best = best_first(scores)[:1]
        # The winner is one row of G: copy it instead of a weighted pass over every row.
        out = rows.G[rows.rows_of(best)].reshape(-1).clone()
        return out, KrumReport(selected=rows.ids(best), scores=dict(zip(rows.all_ids(), scores.tolist())))


class MultiKrumCos(MultiKrum):
    """Multi-Krum ranked with the cosine distance 1 - cos(g_i, g_j) instead of the squared L2 distance."""

    distance = "cosine"


@dataclass
class BulyanReport(Report):
    beta: int = 0   # values averaged per coordinate


class Bulyan(Aggregator):
    r"""Bulyan (El Mhamdi et al., ICML 2018) over Krum.

    1. Pick $\theta = n - 2f$ updates by repeated Krum: each time rescore the $r$ remaining
       updates with their $r - f - 2$ nearest remaining neighbours and move the best one.
    2. Per coordinate, average the $\beta = \theta - 2f$ picked values closest to the coordinate
       median of the picked updates (ties in distance go to the lower client index).

    Requires n >= 4f+3. Ignores weights. Step 2 is ``ops.closest_to_median_mean``.
    """

    def __init__(self, f: int, **kw):
        super().__init__(**kw)
        self.f = check_int(self.name, "f", f, 0)

    def check_n(self, n):
        check_krum_f(self.name, self.f, n, need=4, extra=3)

    def aggregate(self, rows: Clients, layout):
        D = rows.pairwise(ops.pairwise_sqdist).double().cpu()
        self.check_n(rows.n)
        theta = rows.n - 2 * self.f
        beta = theta - 2 * self.f
        remaining = torch.arange(rows.n)
        picked = []
        for _ in range(theta):   # theta Krum rounds on the n x n matrix
            sub = D[remaining][:, remaining]
            best = best_first(krum_scores(sub, self.f))[0]
            picked.append(int(remaining[best]))
            remaining = torch.cat([remaining[:best], remaining[best + 1:]])
        picked = torch.tensor(sorted(picked))
        out = ops.closest_to_median_mean(rows.G, beta, rows=rows.rows_of(picked), nonfinite="propagate",
                                         backend=self.backend)   # reads the picked rows in place
        return out, BulyanReport(selected=rows.ids(picked), beta=beta)
