"""AGRAmplifier's density rules (CosDen, EuDen, MgDen) and FLTrust with and without amplification."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .. import ops
from ..layout import Layout
from .base import Aggregator, Clients, Report, check_choice, check_float, check_int, on_cosine_grid, ranking_key


def _stable_order(values: torch.Tensor, descending: bool) -> torch.Tensor:
    """Per-row order of an [n, n] matrix (``ranking_key``); ties go to the lower index."""
    return torch.sort(ranking_key(-values if descending else values), dim=-1, stable=True).indices


@dataclass
class DensityReport(Report):
    scores: dict[str, dict[int, float]] = field(default_factory=dict)   # "cos"/"euclid" -> client -> score


class _Density(Aggregator):
    r"""AGRAmplifier's density rule (Gong et al. 2024, Alg. 2).

    1. Normalize each update to unit L2 norm and amplify it with ``maxpool_amplify`` (``kernel``,
       over ``layout``: by default the layout of the structure passed in, e.g. per parameter for
       state_dicts; give ``Layout.from_shapes`` or ``Layout.flat(width)`` for stacked tensors).
    2. Similarity matrix among all clients, self included: cosine (CosDen) or L2 distance (EuDen).
    3. Each client's k nearest neighbours (itself included; ties to the lower index).
       ``score="paper"`` sums its k similarities; ``score="official"`` (the authors' code) sums the
       k x k block of the matrix among those neighbours.
    4. Keep the ``round(n*(1-malicious_frac))`` best clients (ties to the lower index). The output
       averages the kept original updates (``paper``) or the kept normalized updates (``official``,
       as the authors' code does). MgDen keeps the intersection of the CosDen and EuDen choices.

    Max-pooling is positively homogeneous, so the pooled normalized row is the pooled row over its
    unpooled norm: G is pooled once, never normalized in memory. Ignores weights.
    """

    measures: tuple[str, ...] = ()

    def __init__(self, k_nearest: int, malicious_frac: float, kernel: int = 2, score: str = "paper",
                 layout: Layout | None = None, **kw):
        super().__init__(**kw)
        self.k_nearest = check_int(self.name, "k_nearest", k_nearest, 1)
        self.malicious_frac = check_float(self.name, "malicious_frac", malicious_frac, 0.0, 1.0)
        self.kernel = check_int(self.name, "kernel", kernel, 1)
        self.score = check_choice(self.name, "score", score, ("paper", "official"))
        if layout is not None and not isinstance(layout, Layout):
            raise TypeError(f"{self.name}: layout must be a robustagg.layout.Layout, got {type(layout).__name__}")
        self.layout = layout

    def kept_count(self, n: int) -> int:
        return round(n * (1 - self.malicious_frac))

    def check_n(self, n):
        if self.k_nearest > n:
            raise ValueError(f"{self.name}: k_nearest={self.k_nearest} exceeds n={n} clients; "
                             f"allowed k_nearest in [1, {n}]")
        if self.kept_count(n) < 1:
            raise ValueError(f"{self.name}: malicious_frac={self.malicious_frac} keeps round(n*(1-malicious_frac))="
                             f"{self.kept_count(n)} of n={n} clients; it must keep at least 1")

    def similarities(self, rows: Clients, norm: torch.Tensor, layout) -> dict[str, torch.Tensor]:
        lay = self.layout or layout
        pooled, _ = rows.maxpool(lay, self.kernel)
        if pooled.d == 0:
            raise ValueError(f"{self.name}: layout={lay!r} with kernel={self.kernel} pools the d={rows.d} "
                             "coordinates to none; give a layout with a segment of at least kernel x kernel")
        cos = pooled.pairwise_with_flags(ops.pairwise_cosine)[0]
        cos = rows.local_pairs(cos.double().cpu())   # P pools every row of G
        out = {"cos": cos} if "cos" in self.measures else {}
        if "euclid" in self.measures:
            # ||P_i/N_i - P_j/N_j||^2 = (a_i - a_j)^2 + 2 a_i a_j (1 - cos_ij) with a_i = ||P_i|| / N_i
            pooled_norm = rows.local(pooled.client_stats().norm).cpu()
            a = torch.where(norm > 0, pooled_norm / norm, torch.zeros_like(norm))
            # 1 - cos from the cosine grid: for parallel clients it is 0, not rounding noise, which
            # the square root would lift to 1e-8
            sq = (a[:, None] - a[None, :]) ** 2 + 2 * a[:, None] * a[None, :] * (1 - on_cosine_grid(cos))
            out["euclid"] = sq.clamp_min(0).sqrt()
        return out

    def choose(self, M: torch.Tensor, similar_is_high: bool, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores and the kept clients (bool[n]) for one similarity or distance matrix. The ranks
        come from the matrix on the cosine grid (``on_cosine_grid``: parallel clients tie in every
        order of the sums); the reported scores from the matrix itself."""
        grid = on_cosine_grid(M)
        neighbours = _stable_order(grid, descending=similar_is_high)[:, :self.k_nearest]

        def score(X):
            if self.score == "paper":
                return X.gather(1, neighbours).sum(dim=1)
            return X[neighbours[:, :, None], neighbours[:, None, :]].sum(dim=(1, 2))

        scores = score(M)
        best = _stable_order(score(grid)[None, :], descending=similar_is_high)[0, :keep]
        chosen = torch.zeros(M.shape[0], dtype=torch.bool)
        chosen[best] = True
        return scores, chosen

    def aggregate(self, rows: Clients, layout):
        norm = rows.stats().norm.cpu()   # screens the rows
        self.check_n(rows.n)
        keep = self.kept_count(rows.n)
        chosen = torch.ones(rows.n, dtype=torch.bool)
        report = DensityReport()
        for measure, M in self.similarities(rows, norm, layout).items():
            scores, kept = self.choose(M, measure == "cos", keep)
            chosen &= kept
            report.scores[measure] = dict(zip(rows.all_ids(), scores.tolist()))
        count = max(int(chosen.sum()), 1)
        if self.score == "paper":
            coef = chosen.double() / count
        else:
            coef = torch.where(chosen & (norm > 0), 1 / norm, torch.zeros_like(norm)) / count
        report.selected = rows.ids(chosen)
        return rows.combine(coef), report


class CosDen(_Density):
    __doc__ = _Density.__doc__
    measures = ("cos",)


class EuDen(_Density):
    __doc__ = _Density.__doc__
    measures = ("euclid",)


class MgDen(_Density):
    __doc__ = _Density.__doc__
    measures = ("cos", "euclid")


# ---------------------------------------------------------------- FLTrust

@dataclass
class FLTrustReport(Report):
    trust: dict[int, float] = field(default_factory=dict)   # client -> trust score ReLU(cos)
    all_zero_trust: bool = False                              # output is zeros


class FLTrust(Aggregator):
    r"""FLTrust (Cao et al., NDSS 2021): trust $TS_i = \mathrm{ReLU}(\cos(g_i, g_0))$ against the
    server's root update $g_0$; output $\sum_i TS_i\, g_i \|g_0\|/\|g_i\| / \sum_i TS_i$.
    If every trust score is 0 the output is zeros (``last_report.all_zero_trust``).

    ``root_update`` is a [d] tensor or one client's structure (state_dict, parameter list): the
    server's own update of this round, from its small clean root dataset. Set ``agg.root_update``
    every round (it may start as None). Ignores weights.
    """

    def __init__(self, root_update=None, **kw):
        super().__init__(**kw)
        self.root_update = root_update

    @property
    def root_update(self) -> torch.Tensor:
        return self._root

    @root_update.setter
    def root_update(self, value):
        if value is None:
            self._root = None
            return
        root = value if isinstance(value, torch.Tensor) and value.dim() == 1 else self.flatten([value])[0][0]
        if not bool(torch.isfinite(root).all()):
            raise ValueError(f"{self.name}: root_update holds NaN or Inf; the server's update must be finite")
        self._root = root

    def trust_cosine(self, rows: Clients, root: torch.Tensor, layout) -> tuple[torch.Tensor, torch.Tensor, float]:
        """cos(g_i, g_0), the unpooled norms ||g_i|| and ||g_0||, all float64 (on the CPU)."""
        stats = rows.stats(ref=root)
        return stats.cosine.cpu(), stats.norm.cpu(), float(stats.ref_norm)

    def aggregate(self, rows: Clients, layout):
        d = rows.G.shape[1]
        if self._root is None:
            raise ValueError(f"{self.name}: root_update is None; set agg.root_update to the server's update of "
                             "this round (its own update on its clean root dataset) before aggregating")
        if self._root.shape[0] != d:
            raise ValueError(f"{self.name}: root_update has d={self._root.shape[0]} but the client updates have d={d}")
        root = self._root.to(device=rows.G.device, dtype=rows.G.dtype)
        cosine, norm, root_norm = self.trust_cosine(rows, root, layout)
        trust = cosine.clamp_min(0)                                   # ReLU-clipped cosine
        rescale = torch.where(norm > 0, root_norm / norm, torch.zeros_like(norm))   # to the root norm
        total = float(trust.sum())
        report = FLTrustReport(trust=dict(zip(rows.all_ids(), trust.tolist())), all_zero_trust=total <= 0)
        report.selected = rows.ids(trust > 0)
        if total <= 0:
            return torch.zeros(d, dtype=rows.G.dtype, device=rows.G.device), report
        return rows.combine(trust * rescale / total), report           # trust-weighted mean


class FLTrustAmp(FLTrust):
    r"""FLTrust with AGRAmplifier (Gong et al. 2024): the trust scores use the cosine of the
    max-pooled updates, $TS_i = \mathrm{ReLU}(\cos(\mathrm{pool}(g_i), \mathrm{pool}(g_0)))$; the
    output uses the unpooled updates and norms, as FLTrust. ``layout`` as for CosDen."""

    def __init__(self, root_update=None, kernel: int = 2, layout: Layout | None = None, **kw):
        super().__init__(root_update, **kw)
        self.kernel = check_int(self.name, "kernel", kernel, 1)
        if layout is not None and not isinstance(layout, Layout):
            raise TypeError(f"{self.name}: layout must be a robustagg.layout.Layout, got {type(layout).__name__}")
        self.layout = layout

    def trust_cosine(self, rows, root, layout):
        norm = rows.stats().norm.cpu()   # unpooled norms; screens the rows
        pooled, pooled_root = rows.maxpool(self.layout or layout, self.kernel, root)
        return rows.local(pooled.client_stats(ref=pooled_root).cosine).cpu(), norm, rows.norm(root)
