r"""Model-poisoning attacks (SPEC §6), for tests, benchmarks and simulations.

Every attack is ``attack(G_benign, n_byz, **params) -> G_byz`` of shape (n_byz, d), in
G_benign's dtype and device. The attacker is omniscient: it sees every benign update. Statistics
are computed in float32 (float64 for float64 input). Randomized attacks take ``generator``.
"""
from __future__ import annotations

import math
import numbers
from statistics import NormalDist

import torch

from . import ops

__all__ = ["lie", "byzmean", "min_max", "min_sum", "sign_flip", "gaussian", "noise", "ipm", "scaling",
           "nan_inject", "ATTACKS"]


def _check(G, n_byz, name):
    if not isinstance(G, torch.Tensor) or G.dim() != 2 or G.shape[0] == 0:
        raise ValueError(f"{name}: G_benign must be a 2-D tensor with at least 1 row, got "
                         f"{tuple(G.shape) if isinstance(G, torch.Tensor) else type(G).__name__}")
    if isinstance(n_byz, bool) or not isinstance(n_byz, numbers.Integral) or n_byz < 0:
        raise ValueError(f"{name}: n_byz={n_byz!r} must be an int >= 0")
    return G.to(torch.float64 if G.dtype == torch.float64 else torch.float32)


def _rows(v: torch.Tensor, n_byz: int, like: torch.Tensor) -> torch.Tensor:
    return v.to(like.dtype).expand(n_byz, -1).clone()


def _mean(X):
    return X.mean(dim=0)


def _std(X, name):
    if X.shape[0] < 2:
        raise ValueError(f"{name}: the unbiased std needs at least 2 benign rows, got {X.shape[0]}")
    return X.std(dim=0, unbiased=True)


def lie_z(n: int, f: int) -> float:
    r"""Baruch et al., NeurIPS 2019: $s = \lfloor n/2 + 1\rfloor - f$, $z = \Phi^{-1}((n - s)/n)$."""
    s = math.floor(n / 2 + 1) - f
    p = (n - s) / n
    if not 0 < p < 1:
        raise ValueError(f"lie: the default z needs 0 < (n-s)/n < 1 with s = floor(n/2+1) - f; got n={n}, f={f}, "
                         f"(n-s)/n={p}; pass z explicitly")
    return NormalDist().inv_cdf(p)


def lie(G_benign, n_byz, z: float | None = None):
    r"""A Little Is Enough (Baruch et al. 2019): every row is $\mu - z\sigma$ (coordinate-wise mean and
    unbiased std of the benign rows). ``z`` defaults to the paper's value for n = benign + n_byz
    clients and f = n_byz."""
    X = _check(G_benign, n_byz, "lie")
    if z is None:
        z = lie_z(X.shape[0] + n_byz, n_byz)
    return _rows(_mean(X) - z * _std(X, "lie"), n_byz, G_benign)


def byzmean(G_benign, n_byz, m1: int | None = None, inner=lie, **inner_params):
    r"""ByzMean (Xu et al. 2022, Eq. 8): ``m1`` rows are $g_1$ from the ``inner`` attack and the other
    $m_2 = n_{byz} - m_1$ rows are $g_2 = ((n - m_1) g_1 - \sum_{benign} g_i) / m_2$, so that the mean of
    all n rows equals $g_1$. ``m1`` defaults to n_byz // 2."""
    X = _check(G_benign, n_byz, "byzmean")
    m1 = n_byz // 2 if m1 is None else m1
    if not 0 <= m1 < n_byz:
        raise ValueError(f"byzmean: m1={m1} must be in [0, {n_byz - 1}] so that m2 = n_byz - m1 >= 1")
    n, m2 = X.shape[0] + n_byz, n_byz - m1
    g1 = inner(G_benign, n_byz, **inner_params)[0].to(X.dtype)
    g2 = ((n - m1) * g1 - X.sum(dim=0)) / m2
    return torch.cat([_rows(g1, m1, G_benign), _rows(g2, m2, G_benign)])


def _perturbation(X, kind, name):
    mu = _mean(X)
    if kind == "unit":
        norm = mu.norm()
        return -mu / norm if norm > 0 else torch.zeros_like(mu)
    if kind == "std":
        return -_std(X, name)
    if kind == "sign":
        return -torch.sign(mu)
    raise ValueError(f"{name}: perturbation={kind!r} is not one of ('unit', 'std', 'sign')")


def _gamma_search(fits, gamma_init: float, tol: float) -> float:
    """Shejwalkar & Houmansadr's search for the largest gamma that ``fits``: move by half the last
    step up after a success and down after a failure, until the move is below ``tol``."""
    gamma, step, best = gamma_init, gamma_init / 2, 0.0
    while abs(best - gamma) > tol and step > tol / 4:
        if fits(gamma):
            best, gamma = gamma, gamma + step
        else:
            gamma = gamma - step
        step /= 2
    return best


def _agr_agnostic(G_benign, n_byz, perturbation, gamma_init, tol, name, use_max):
    X = _check(G_benign, n_byz, name).double()
    mu = _mean(X)
    p = _perturbation(X, perturbation, name)
    diff = mu - X                          # ||mu + gamma p - g_i||^2 = A_i + 2 gamma B_i + gamma^2 C
    A, B, C = (diff * diff).sum(1), diff @ p, p @ p
    D = ops.pairwise_sqdist(X, nonfinite="propagate")
    if use_max:                            # Min-Max: max distance within the benign max distance
        bound = D.max()
        fits = (lambda g: bool((A + 2 * g * B + g * g * C).max() <= bound))
    else:                                  # Min-Sum: sum of squared distances within the benign max sum
        bound = D.sum(dim=1).max()
        fits = (lambda g: bool((A + 2 * g * B + g * g * C).sum() <= bound))
    gamma = _gamma_search(fits, gamma_init, tol)
    return _rows(mu + gamma * p, n_byz, G_benign)


def min_max(G_benign, n_byz, perturbation: str = "unit", gamma_init: float = 10.0, tol: float = 1e-5):
    r"""Min-Max (Shejwalkar & Houmansadr, NDSS 2021): $\mu + \gamma p$ with the largest $\gamma$ found
    by the search such that $\max_i \|\mu + \gamma p - g_i\| \le \max_{i,j} \|g_i - g_j\|$.
    ``perturbation``: "unit" ($-\mu/\|\mu\|$), "std" ($-\sigma$) or "sign" ($-\mathrm{sign}(\mu)$)."""
    return _agr_agnostic(G_benign, n_byz, perturbation, gamma_init, tol, "min_max", use_max=True)


def min_sum(G_benign, n_byz, perturbation: str = "unit", gamma_init: float = 10.0, tol: float = 1e-5):
    r"""Min-Sum (Shejwalkar & Houmansadr, NDSS 2021): as ``min_max`` with
    $\sum_i \|\mu + \gamma p - g_i\|^2 \le \max_i \sum_j \|g_i - g_j\|^2$ (squared distances)."""
    return _agr_agnostic(G_benign, n_byz, perturbation, gamma_init, tol, "min_sum", use_max=False)


def sign_flip(G_benign, n_byz, scale: float = 1.0):
    r"""Every row is $-\mathrm{scale}\cdot\mu$."""
    X = _check(G_benign, n_byz, "sign_flip")
    return _rows(-scale * _mean(X), n_byz, G_benign)


def _normal(shape, sigma, X, generator):
    return torch.randn(shape, generator=generator, dtype=X.dtype,
                       device=generator.device if generator is not None else X.device).to(X.device) * sigma


def gaussian(G_benign, n_byz, sigma: float = 1.0, generator: torch.Generator | None = None):
    r"""Every row is drawn from $N(0, \sigma^2 I)$."""
    X = _check(G_benign, n_byz, "gaussian")
    return _normal((n_byz, X.shape[1]), sigma, X, generator).to(G_benign.dtype)


def noise(G_benign, n_byz, sigma: float = 1.0, generator: torch.Generator | None = None):
    r"""Every row is $\mu + N(0, \sigma^2 I)$."""
    X = _check(G_benign, n_byz, "noise")
    return (_mean(X) + _normal((n_byz, X.shape[1]), sigma, X, generator)).to(G_benign.dtype)


def ipm(G_benign, n_byz, eps: float = 0.5):
    r"""Inner-product manipulation (Xie et al. 2020): every row is $-\epsilon\mu$."""
    X = _check(G_benign, n_byz, "ipm")
    return _rows(-eps * _mean(X), n_byz, G_benign)


def scaling(G_benign, n_byz, factor: float = 100.0):
    r"""Every row is $\mathrm{factor}\cdot\mu$."""
    X = _check(G_benign, n_byz, "scaling")
    return _rows(factor * _mean(X), n_byz, G_benign)


def nan_inject(G_benign, n_byz, kind: str = "nan", value: float = float("nan"),
               generator: torch.Generator | None = None):
    """Non-finite rows: ``kind="nan"``, ``"inf"`` or ``"-inf"`` fill whole rows; ``"entry"`` sends the
    benign mean with one entry set to ``value`` (NaN by default) at a position drawn from
    ``generator``, an otherwise honest-looking row."""
    X = _check(G_benign, n_byz, "nan_inject")
    fill = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}
    if kind in fill:
        return torch.full((n_byz, X.shape[1]), fill[kind], dtype=G_benign.dtype, device=G_benign.device)
    if kind != "entry":
        raise ValueError(f"nan_inject: kind={kind!r} is not one of ('nan', 'inf', '-inf', 'entry')")
    if math.isfinite(value):
        raise ValueError(f"nan_inject: value={value} must be NaN or +-Inf for kind='entry'")
    rows = _rows(_mean(X), n_byz, G_benign)
    where = torch.randint(0, X.shape[1], (n_byz,), generator=generator).to(rows.device)
    rows[torch.arange(n_byz, device=rows.device), where] = value
    return rows


ATTACKS = {f.__name__: f for f in (lie, byzmean, min_max, min_sum, sign_flip, gaussian, noise, ipm, scaling,
                                   nan_inject)}
