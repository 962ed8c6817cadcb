"""Baselines the seed defenses compare against: FedAvg, coordinate-wise median, trimmed mean and
mean around the median, SignSGD, norm clipping, the geometric median (RFA) and centered clipping."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .. import ops
from .._dtypes import acc_dtype
from .base import (Aggregator, Clients, Report, check_float, check_int, check_majority_f, check_multiplier,
                   make_generator)


class FedAvg(Aggregator):
    r"""Weighted mean (McMahan et al. 2017): $\sum_i w_i g_i / \sum_i w_i$; weights default to 1."""

    uses_weights = True
    default_buffers = "kept_mean"   # the baseline: the plain weighted mean of every entry, buffers too

    def aggregate(self, rows: Clients, layout):
        # rlr with theta = 0 sets lr = +1 everywhere: the fused weighted mean, one pass over G.
        out = rows.run(ops.rlr, 0, weights=rows.weights_by_row)
        return out, Report(selected=rows.all_ids())


class CoordinateMedian(Aggregator):
    """Coordinate-wise median (Yin et al. 2018), numpy-style for even n. Ignores weights."""

    default_buffers = "rule"   # robust per coordinate, every client kept

    def aggregate(self, rows: Clients, layout):
        return rows.run(ops.median), Report(selected=rows.all_ids())


@dataclass
class TrimmedMeanReport(Report):
    trim: int = 0


class TrimmedMean(Aggregator):
    """Coordinate-wise trimmed mean (Yin et al. 2018): drop the ``trim`` smallest and largest values.

    Give ``trim`` (a count) or ``alpha`` (``trim = ceil(alpha * n)`` on the rows aggregated).
    Ignores weights.
    """

    default_buffers = "rule"   # robust per coordinate, every client kept

    def __init__(self, trim: int | None = None, alpha: float | None = None, **kw):
        super().__init__(**kw)
        if (trim is None) == (alpha is None):
            raise ValueError(f"TrimmedMean: give exactly one of trim (a count) or alpha (a fraction); "
                             f"got trim={trim!r}, alpha={alpha!r}")
        self.trim = None if trim is None else check_int(self.name, "trim", trim, 0)
        self.alpha = None if alpha is None else check_float(self.name, "alpha", alpha, 0.0, 0.5)

    def trim_for(self, n: int) -> int:
        trim = self.trim if self.trim is not None else math.ceil(self.alpha * n)
        if n - 2 * trim < 1:
            given = f"trim={trim}" if self.alpha is None else f"alpha={self.alpha} (trim=ceil(alpha*n)={trim})"
            raise ValueError(f"{self.name}: {given} leaves nothing for n={n} clients; "
                             f"trim must be in [0, {(n - 1) // 2}] so that n - 2*trim >= 1")
        return trim

    def check_n(self, n):
        self.trim_for(n)

    def aggregate(self, rows: Clients, layout):
        out = rows.run(ops.trimmed_mean, lambda r: self.trim_for(r.n))
        return out, TrimmedMeanReport(selected=rows.all_ids(), trim=self.trim_for(rows.n))


@dataclass
class MeamedReport(Report):
    kept: int = 0   # values averaged per coordinate (n - f)


class Meamed(Aggregator):
    r"""Mean around the median (Xie, Koyejo & Gupta 2018, "Generalized Byzantine-tolerant SGD"):
    per coordinate $k$, the mean of the $n - f$ values nearest the coordinate median,

    $$\mathrm{Meamed}_f(g)_k = \frac{1}{n-f} \sum_{i \in T_k} g_{ik}, \qquad
    T_k = \text{the } n-f \text{ clients } i \text{ with the least } |g_{ik} - \mathrm{med}_k|.$$

    The median is numpy-style (the mean of the two middle values for an even n), ties in distance
    go to the lower client index (they matter only between different values at equal distance,
    such as med - 1 and med + 1). ByzFL's ``Meamed`` has the same median and leaves ties to
    ``argpartition``.
    Requires n >= 2f+1 (the paper's q <= ceil(m/2) - 1), checked on the finite clients.
    Ignores weights. One pass over G: ``ops.closest_to_median_mean(G, n - f)``.
    """

    default_buffers = "rule"   # robust per coordinate, every client kept

    def __init__(self, f: int, **kw):
        super().__init__(**kw)
        self.f = check_int(self.name, "f", f, 0)

    def kept_for(self, n: int) -> int:
        return n - check_majority_f(self.name, self.f, n)

    def check_n(self, n):
        self.kept_for(n)

    def aggregate(self, rows: Clients, layout):
        out = rows.run(ops.closest_to_median_mean, lambda r: self.kept_for(r.n))
        return out, MeamedReport(selected=rows.all_ids(), kept=self.kept_for(rows.n))


class SignSGD(Aggregator):
    r"""Majority vote (Bernstein et al., ICLR 2019): $s \cdot \operatorname{sign}(\sum_i \operatorname{sign}(g_i))$.
    Ignores weights.

    The paper's step $s$ is a fixed learning rate tuned per task: pass it as ``server_lr``. A fixed
    step suits one scale of updates only (``server_lr=1`` moves every coordinate of a model by 1 a
    round), so by default (``server_lr=None``) $s$ is the median client norm over
    $\sqrt d$, which gives the vote about the length of a typical client update, at any scale.
    """

    def __init__(self, server_lr: float | None = None, **kw):
        super().__init__(**kw)
        self.server_lr = None if server_lr is None else check_float(self.name, "server_lr", server_lr)

    def aggregate(self, rows: Clients, layout):
        if self.server_lr is None:
            step = median_norm_step(rows.stats().norm, rows.d)   # screens the rows
        else:
            step = check_multiplier(self.name, "server_lr", self.server_lr, rows.G.dtype)
        votes = rows.run(ops.sign_sum)
        out = (torch.sign(votes).to(acc_dtype(rows.G.dtype)) * step).to(rows.G.dtype)
        return out, Report(selected=rows.all_ids())


def median_norm_step(norm: torch.Tensor, d: int) -> float:
    r"""$\mathrm{med}_i \|g_i\| / \sqrt d$ (the lower median under an even n): the per-coordinate
    step that gives a full sign vector of d entries the median client norm. Byzantine clients in a
    minority cannot move it outside the range of the honest norms."""
    return float(norm.double().median()) / math.sqrt(d)


@dataclass
class ClippingReport(Report):
    clipped: list[int] | None = None   # clients whose update was scaled down


class NormClipping(Aggregator):
    r"""Weak DP (Sun et al. 2019): clip each row to $\|g_i\| \le$ ``max_norm``, take the weighted mean,
    add $N(0, (\mathrm{noise}\cdot\mathrm{max\_norm})^2 I)$ drawn from ``generator``/``seed``."""

    uses_weights = True

    def __init__(self, max_norm: float, noise: float = 0.0, *, generator=None, seed=None, **kw):
        super().__init__(**kw)
        self.max_norm = check_float(self.name, "max_norm", max_norm, 0.0, lo_open=True)
        self.noise = check_float(self.name, "noise", noise, 0.0)
        self.generator = make_generator(generator, seed)

    def aggregate(self, rows: Clients, layout):
        norm = rows.stats().norm.double()
        scale = clip_factor(norm, self.max_norm)
        w = rows.weights_or_ones()
        # mean of clipped rows = sum_i (w_i * scale_i) g_i / sum_i w_i: one pass, no clipped copy of G.
        out = rows.combine(w * scale / w.sum())
        if self.noise > 0:
            out = out + rows.gaussian(self.noise * self.max_norm, out, self.generator)
        return out, ClippingReport(selected=rows.all_ids(), clipped=rows.ids(scale < 1))


def clip_factor(norm: torch.Tensor, max_norm) -> torch.Tensor:
    """min(1, max_norm / norm) per client; 1 for a zero row."""
    max_norm = torch.as_tensor(max_norm, dtype=torch.float64, device=norm.device)
    return torch.where(norm > max_norm, max_norm / norm, torch.ones_like(norm))


# ---------------------------------------------------------------- iterations on an explicit point
#
# The geometric median and centered clipping move a point z through the span of the rows. Every
# iteration forms z explicitly (one weighted-mean pass over G) and measures every client's distance
# to it directly (one client_stats pass, ||g_i - z|| from the differences, scaled in float64). The
# affine Gram identity ||sum_i a_i g_i - g_j||^2 = (Da)_j - a^T D a / 2 would need one pairwise pass
# only, but it cancels catastrophically when one client is far away (docs/nonfinite.md).

@dataclass
class GeometricMedianReport(Report):
    iterations: int = 0
    converged: bool = False


class GeometricMedian(Aggregator):
    r"""RFA (Pillutla et al., IEEE TSP 2022, smoothed Weiszfeld):
    $\beta_i = \alpha_i / \max(\nu, \|z - g_i\|)$, $z \leftarrow \sum_i \beta_i g_i / \sum_i \beta_i$,
    from the weighted mean, until $\|z_{t+1} - z_t\| \le \mathrm{tol}\,\|z_t\|$ or ``max_iter``.

    ``weights`` are the $\alpha_i$. The authors' code stops on the relative change of the
    objective instead; this one uses the step-size test above. Each iteration reads G twice:
    the distances to z, then the new z.
    """

    default_buffers = "rule"   # a robust point, every client kept
    uses_weights = True

    def __init__(self, nu: float = 1e-6, max_iter: int = 100, tol: float = 1e-7, **kw):
        super().__init__(**kw)
        self.nu = check_float(self.name, "nu", nu, 0.0, lo_open=True)
        self.max_iter = check_int(self.name, "max_iter", max_iter, 0)
        self.tol = check_float(self.name, "tol", tol, 0.0)

    def aggregate(self, rows: Clients, layout):
        z = rows.weighted_mean(rows.weights_or_ones())
        iterations, converged = 0, False
        while iterations < self.max_iter and not converged:
            dist = rows.stats(ref=z).ref_dist                               # ||z - g_i||, one pass
            beta = rows.weights_or_ones() / dist.clamp_min(self.nu)
            new = rows.weighted_mean(beta)                                  # one pass
            moved, size = rows.distance(new, z)
            z, iterations = new, iterations + 1
            converged = moved <= self.tol * size
        return z, GeometricMedianReport(selected=rows.all_ids(), iterations=iterations, converged=converged)


@dataclass
class CenteredClippingReport(Report):
    clipped_fraction: float = 0.0  # clients scaled down in the last iteration


class CenteredClipping(Aggregator):
    r"""Centered clipping (Karimireddy et al., ICML 2021): from the previous aggregate $v$,
    ``iters`` times $v \leftarrow v + \frac1n \sum_i (g_i - v)\min(1, \tau/\|g_i - v\|)$.

    Stateful: the center is the previous round's output (zeros at first), saved by
    ``state_dict()``. The authors apply it to worker momenta; what the caller passes is their
    choice. Ignores weights. Each iteration reads G twice: the distances to v, then the new v.
    """

    def __init__(self, tau: float = 10.0, iters: int = 1, **kw):
        super().__init__(**kw)
        self.tau = check_float(self.name, "tau", tau, 0.0, lo_open=True)
        self.iters = check_int(self.name, "iters", iters, 1)
        self.center: torch.Tensor | None = None

    def state_dict(self) -> dict:
        return {"center": None if self.center is None else self.center.clone()}

    def load_state_dict(self, state: dict) -> None:
        center = state["center"]
        if center is not None and (center.dim() != 1 or not bool(torch.isfinite(center).all())):
            raise ValueError(f"{self.name}: center must be a finite 1-D tensor, got shape {tuple(center.shape)}")
        self.center = None if center is None else center.clone()

    def aggregate(self, rows: Clients, layout):
        d = rows.G.shape[1]
        if self.center is not None and self.center.shape[0] != d:
            raise ValueError(f"{self.name}: the saved center has d={self.center.shape[0]} but the updates have d={d}")
        v = self.center if self.center is not None else torch.zeros(d, dtype=rows.G.dtype, device=rows.G.device)
        v = v.to(device=rows.G.device, dtype=rows.G.dtype)
        for _ in range(self.iters):
            dist = rows.stats(ref=v).ref_dist                               # ||g_i - v||, one pass
            s = clip_factor(dist, self.tau)
            # v + (1/n) sum_i s_i (g_i - v) = sum_i (s_i / n) g_i + (1 - sum_i s_i / n) v
            kept = float(1 - s.sum() / rows.n)
            v = (rows.combine(s / rows.n).double() + kept * v.double()).to(rows.G.dtype)
        self.center = v.clone()
        return v, CenteredClippingReport(selected=rows.all_ids(), clipped_fraction=float((s < 1).double().mean()))
