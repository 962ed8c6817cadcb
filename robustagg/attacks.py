r"""Model-poisoning attacks (docs/attacks.md), for tests, benchmarks and simulations.

Every attack is ``attack(G_benign, n_byz, **params) -> G_byz`` of shape (n_byz, d), in
G_benign's dtype and device. The attacker is omniscient: it sees every benign update. Statistics
are computed in float32 (float64 for float64 input). Randomized attacks take ``generator``.
``apply(updates, byzantine, attack, **params)`` runs one on any structure of client updates.
"""
from __future__ import annotations

import copy
import math
import numbers
from dataclasses import dataclass
from statistics import NormalDist

import torch

from . import ops
from ._checks import check_float, check_int
from .aggregators.base import Aggregator
from .layout import flatten, is_integer
from .reference import power_of_two_exponents, row_norms, scale_rows

__all__ = ["lie", "byzmean", "min_max", "min_sum", "sign_flip", "gaussian", "noise", "ipm", "scaling",
           "nan_inject", "mimic", "mimic_target", "optimal_ipm", "optimal_alie", "optimal_scale", "LineSearch",
           "apply", "ATTACKS", "ADAPTIVE_ATTACKS"]


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
    """Shejwalkar & Houmansadr's search for the largest gamma that ``fits`` (their released code: lamda,
    lamda_succ, lamda_fail, threshold_diff = 1e-5): move by half the last step up after a success and
    down after a failure, until the move is below ``tol``. In exact arithmetic gamma - best = 2 step,
    so ``step > tol / 4`` never ends the loop first; it ends it where the released code loops forever,
    when gamma is so large that a step below its ulp no longer moves it."""
    gamma, step, best = gamma_init, gamma_init / 2, 0.0
    while abs(best - gamma) > tol and step > tol / 4:
        if fits(gamma):
            best, gamma = gamma, gamma + step
        else:
            gamma = gamma - step
        step /= 2
    return best


def _upper_root(half_slope, slack):
    r"""The larger root $-b + \sqrt{b^2 + s}$ of $u^2 + 2bu - s$, for $s \ge 0$, elementwise. For b > 0
    that difference cancels, so use $s / (b + \sqrt{b^2 + s})$ there: the product of the roots is $-s$
    (the citardauq form of $q = -(b + \mathrm{sign}(b)\sqrt{b^2 + s})$)."""
    root = torch.sqrt(half_slope * half_slope + slack)
    return torch.where(half_slope > 0, slack / (half_slope + root), root - half_slope)


def _exact_gamma(A, B, C, bound, fits, use_max) -> float:
    if C == 0:                             # p = 0: mu + gamma p = mu for every gamma, nothing binds
        return 0.0
    if not fits(0.0):                      # only by rounding or non-finite rows (see min_max)
        return 0.0
    # In u = gamma sqrt(C) (sqrt(nC) for the sum) the quadratic is monic, with coefficients a distance
    # (|B_i| / sqrt(C) <= ||mu - g_i||, Cauchy-Schwarz) and squared distances: nothing overflows in the
    # root that does not already overflow in the bound.
    if use_max:                            # every row's quadratic is convex, <= bound at 0: the nearest root
        scale = C.sqrt()
        gamma = (_upper_root(B / scale, bound - A).min() / scale).item()
    else:                                  # one quadratic; B.sum() is 0 up to rounding since mu is the mean
        scale = (A.numel() * C).sqrt()
        gamma = (_upper_root(B.sum() / scale, bound - A.sum()) / scale).item()
    # The root and the constraint are each rounded, so the root may land a few ulps past the constraint
    # as fits evaluates it (at most 3 steps in 1800 random and scaled trials); step down to the nearest
    # float that fits. The loop ends: fits(0) holds.
    while not fits(gamma):
        gamma = math.nextafter(gamma, 0.0)
    return gamma


def _agr_agnostic(G_benign, n_byz, perturbation, search, gamma_init, tol, name, use_max):
    """(mu, p, gamma) in float64, gamma the largest that fits as found by ``search``."""
    if search not in ("exact", "authors"):
        raise ValueError(f"{name}: search={search!r} is not one of ('exact', 'authors')")
    gamma_init = check_float(name, "gamma_init", gamma_init, lo=0.0, lo_open=True)
    tol = check_float(name, "tol", tol, lo=0.0, lo_open=True)
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
        # (the paper's max_i; the authors' released code bounds by the min_i of the sums instead)
        bound = D.sum(dim=1).max()
        fits = (lambda g: bool((A + 2 * g * B + g * g * C).sum() <= bound))
    if search == "authors":
        return mu, p, _gamma_search(fits, gamma_init, tol)
    return mu, p, _exact_gamma(A, B, C, bound, fits, use_max)


def min_max(G_benign, n_byz, perturbation: str = "unit", *, search: str = "exact", gamma_init: float = 10.0,
            tol: float = 1e-5):
    r"""Min-Max (Shejwalkar & Houmansadr, NDSS 2021): every row is $\mu + \gamma p$ with the
    largest $\gamma \ge 0$ such that $\max_i \|\mu + \gamma p - g_i\| \le \max_{i,j} \|g_i - g_j\|$.
    ``perturbation``: "unit" ($-\mu/\|\mu\|$), "std" ($-\sigma$) or "sign" ($-\mathrm{sign}(\mu)$).

    ``search="exact"`` solves for $\gamma$: with $A_i = \|\mu - g_i\|^2$, $B_i = (\mu - g_i)\cdot p$ and
    $C = \|p\|^2$ each squared distance is $A_i + 2\gamma B_i + \gamma^2 C$, convex in $\gamma$ and at
    most the bound at $\gamma = 0$ ($\|\mu - g_i\| \le \frac{n-1}{n}\max_j \|g_i - g_j\|$ by the
    triangle inequality), so $\gamma$ is the smallest of the upper roots, computed in float64 without
    cancellation and, should rounding put it past the constraint as evaluated in float64, stepped down
    to the nearest float64 that satisfies it. The rows are then rounded to G_benign's dtype.
    ``search="authors"`` is the authors' halving search from ``gamma_init`` to the absolute ``tol``
    (only it uses them; both are checked for either search): its error is up to 2 tol, 1-3% of
    $\gamma \approx 6\cdot 10^{-4}$ for "sign" on updates around 1e-3.

    Every row is the benign mean ($\gamma = 0$) when no $\gamma > 0$ fits (identical benign rows), when
    $p = 0$ (a zero mean with "unit" or "sign", identical rows with "std"), where
    $\mu + \gamma p = \mu$ for every $\gamma$, and when the constraint fails at $\gamma = 0$, which
    only NaN or Inf rows (their NaN bound) or rounding can cause."""
    mu, p, gamma = _agr_agnostic(G_benign, n_byz, perturbation, search, gamma_init, tol, "min_max", use_max=True)
    return _rows(mu + gamma * p, n_byz, G_benign)


def min_sum(G_benign, n_byz, perturbation: str = "unit", *, search: str = "exact", gamma_init: float = 10.0,
            tol: float = 1e-5):
    r"""Min-Sum (Shejwalkar & Houmansadr, NDSS 2021): as ``min_max`` with
    $\sum_i \|\mu + \gamma p - g_i\|^2 \le \max_i \sum_j \|g_i - g_j\|^2$ (squared distances). The sum
    $\sum_i A_i + 2\gamma \sum_i B_i + n\gamma^2 C$ is one quadratic; it is at most the bound at
    $\gamma = 0$ since $\sum_j \|g_i - g_j\|^2 = n A_i + \sum_j A_j$, and ``search="exact"`` takes its
    upper root. Edge cases and ``search``, ``gamma_init``, ``tol`` are as in ``min_max``."""
    mu, p, gamma = _agr_agnostic(G_benign, n_byz, perturbation, search, gamma_init, tol, "min_sum", use_max=False)
    return _rows(mu + gamma * p, n_byz, G_benign)


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


def _unit_scaled(Y):
    """Y times the power of two that puts max|Y| in [0.5, 1) (Y itself when it is all zeros)."""
    return scale_rows(Y.reshape(1, -1), power_of_two_exponents(Y.reshape(1, -1))).reshape(Y.shape)


def mimic_target(G_benign) -> int:
    r"""The honest row that ``mimic`` copies by default: Karimireddy, He & Jaggi's heuristic, the
    client farthest along the top principal direction $z$ of the honest updates,
    $i^* = \arg\max_i |\langle g_i - \mu, z\rangle|$, $z = \arg\max_{\|z\|=1} \sum_i \langle g_i - \mu, z\rangle^2$.

    Computed in the $m \times m$ Gram space of the explicitly centered rows $Y_i = (g_i - \mu)$
    (float64, scaled by a power of two so that no product overflows): the top eigenvector $u$ of
    $Y Y^\top$ gives the projections $Y z = \sqrt{\lambda}\,u$, so $i^* = \arg\max_i |u_i|$ (the
    lowest index on ties; the first finite row when they are all equal). The absolute value makes the choice
    independent of the eigenvector's sign, which the paper's signed argmax leaves to the online
    estimate's random start. Rows holding NaN or Inf are never chosen; at least one must be finite."""
    X = _check(G_benign, 0, "mimic").double()
    finite = torch.isfinite(X).all(dim=1)
    if not bool(finite.any()):
        raise ValueError("mimic: every benign row holds NaN or Inf; the default target needs a finite row "
                         "(pass target explicitly)")
    ids = torch.nonzero(finite).flatten()
    if bool((X[ids] == X[ids[0]]).all()):  # no direction at all (a rounded mean would invent one)
        return int(ids[0])
    Y = _unit_scaled(X[ids])               # exact power-of-two scalings: no product below over- or underflows
    Y = _unit_scaled(Y - Y.mean(dim=0))    # centered around the mean row directly, never through the Gram
    _, vectors = torch.linalg.eigh(Y @ Y.T)
    return int(ids[torch.argmax(vectors[:, -1].abs())])


def mimic(G_benign, n_byz, target: int | None = None):
    r"""Mimic (Karimireddy, He & Jaggi, ICLR 2022, "Byzantine-Robust Learning on Heterogeneous Datasets
    via Bucketing"): every Byzantine row is a copy of one honest row $g_{i^*}$, which over-weights
    that client's data and under-represents the others' under heterogeneity.

    ``target`` (an index into G_benign) chooses $i^*$; by default ``mimic_target`` does, from this
    round's updates alone. The authors' attacker is stateful: it estimates $z$ online (one power
    step per round from a seeded random start, a running mean $\mu$), re-chooses $i^*$ during a
    warm-up and then keeps it fixed. This function is stateless: it uses the exact top direction of
    the current round; for the fixed-after-warm-up behaviour pass the index found in the warm-up
    rounds as ``target``. ByzFL's ``Mimic(epsilon)`` is ``target=epsilon`` (it has no heuristic)."""
    X = _check(G_benign, n_byz, "mimic")
    target = mimic_target(G_benign) if target is None else check_int("mimic", "target", target, 0, X.shape[0] - 1)
    return _rows(G_benign[target], n_byz, G_benign)


@dataclass(frozen=True)
class LineSearch:
    """What ``optimal_scale`` found: the best ``scale``, its ``distance``, and every ``trials``
    entry (scale, distance) in evaluation order; a distance of -inf marks a non-finite one."""
    scale: float
    distance: float
    trials: tuple


def _check_search(name, aggregator, evals, start, delta, ratio, pre):
    if not callable(aggregator):
        raise TypeError(f"{name}: aggregator must be an aggregator or a callable of an (n, d) tensor, "
                        f"got {aggregator!r}")
    if callable(pre) or isinstance(pre, (str, bytes)) or not hasattr(pre, "__iter__"):
        raise TypeError(f"{name}: pre must be a sequence of callables (n, d) -> (n', d), got {pre!r}")
    pre = tuple(pre)
    for p in pre:
        if not callable(p):
            raise TypeError(f"{name}: pre holds {p!r}, which is not callable")
    evals = check_int(name, "evals", evals, 1)
    start = check_float(name, "start", start)
    delta = check_float(name, "delta", delta)
    if delta == 0:
        raise ValueError(f"{name}: delta=0.0 is out of range; allowed non-zero (and finite)")
    ratio = check_float(name, "ratio", ratio, lo=0.5, lo_open=True, hi=1.0, hi_open=True)
    return evals, start, delta, ratio, pre


def optimal_scale(G_benign, n_byz, attack, aggregator, *, evals: int = 20, start: float = 0.0,
                  delta: float = 10.0, ratio: float = 0.8, pre=()) -> LineSearch:
    r"""Line search for the scale $s$ of ``attack(G_benign, n_byz, s)`` that maximises
    $\|\mathrm{agg}(\mathrm{pre}(G_{benign}; B(s))) - \mu\|_2$, $B(s)$ the Byzantine rows appended
    after the honest rows (ByzFL's order), ``pre`` applied in turn, $\mu$ the honest mean; the
    distance is computed in float64 (scaled, so a finite huge one stays finite).

    The search is ByzFL's (Optimal_InnerProductManipulation / Optimal_ALittleIsEnough), ``evals``
    evaluations in all: evaluate ``start``; expansion: propose best + step (step = ``delta``), on a
    strict improvement take it and double the step, otherwise multiply the step by ``ratio`` and
    stop; contraction, with the evaluations left: propose best + step, take it on a strict
    improvement, multiply the step by ``ratio`` every time. Proposals always move by +step, so the
    sign of ``delta`` sets the direction searched.

    A trial whose aggregate or distance is NaN or Inf counts as -inf, so it never becomes the best
    (ByzFL takes an Inf distance as an improvement and a NaN one as none). A robustagg Aggregator
    is deep-copied for each trial: each one meets the server's current state (CenteredClipping's
    center, a generator) and the caller's object is left as it was; other callables are called as
    they are."""
    return _line_search(G_benign, n_byz, attack, aggregator, evals, start, delta, ratio, pre, "optimal_scale")


def _line_search(G_benign, n_byz, attack, aggregator, evals, start, delta, ratio, pre, name) -> LineSearch:
    X = _check(G_benign, n_byz, name)
    evals, start, delta, ratio, pre = _check_search(name, aggregator, evals, start, delta, ratio, pre)
    mu = X.double().mean(dim=0)
    trials = []

    def evaluate(scale):
        vectors = torch.cat([G_benign, attack(G_benign, n_byz, scale).to(G_benign.dtype)])
        for p in pre:
            vectors = p(vectors)
            if not isinstance(vectors, torch.Tensor) or vectors.dim() != 2 or vectors.shape[1] != X.shape[1]:
                raise ValueError(f"{name}: pre step {p!r} returned {getattr(vectors, 'shape', type(vectors))}; "
                                 f"it must return an (n', {X.shape[1]}) tensor")
        trial = copy.deepcopy(aggregator) if isinstance(aggregator, Aggregator) else aggregator
        out = trial(vectors)
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != (X.shape[1],):
            raise ValueError(f"{name}: the aggregator returned {getattr(out, 'shape', type(out))}; it must "
                             f"return a [{X.shape[1]}] tensor")
        diff = out.detach().to(mu.device, torch.float64) - mu
        distance = row_norms(diff[None])[0].item() if bool(torch.isfinite(diff).all()) else -math.inf
        distance = distance if math.isfinite(distance) else -math.inf
        trials.append((scale, distance))
        return distance

    best, best_y, step, left = start, evaluate(start), delta, evals - 1
    while left > 0:                        # expansion
        left -= 1
        y = evaluate(best + step)
        if y > best_y:
            best, best_y, step = best + step, y, step * 2
        else:
            step *= ratio
            break
    while left > 0:                        # contraction
        left -= 1
        y = evaluate(best + step)
        if y > best_y:
            best, best_y = best + step, y
        step *= ratio
    return LineSearch(best, best_y, tuple(trials))


def optimal_ipm(G_benign, n_byz, aggregator, *, evals: int = 20, start: float = 0.0, delta: float = 10.0,
                ratio: float = 0.8, pre=()):
    r"""IPM with a searched $\epsilon$: every row is ``ipm(G_benign, n_byz, eps)``, $-\epsilon\mu$
    (Xie et al. 2020), with $\epsilon$ the ``optimal_scale`` line search's best against
    ``aggregator`` (a robustagg aggregator or any callable of an (n, d) tensor returning [d]),
    after the ``pre`` steps. ``optimal_scale(G_benign, n_byz, ipm, aggregator, ...)`` returns the
    $\epsilon$ found, its distance and the trials.

    ByzFL's ``Optimal_InnerProductManipulation(agg, pre_agg_list, f, evals, start, delta, ratio)``
    is this with n_byz = f and the same evals, start, delta, ratio (its tau is our eps). Its
    defaults differ: ``agg=Average()``, ``pre_agg_list=[Clipping(c=2.0)]``; ours has no default
    aggregator and ``pre=()``."""
    found = _line_search(G_benign, n_byz, ipm, aggregator, evals, start, delta, ratio, pre,
                         "optimal_ipm")
    return ipm(G_benign, n_byz, found.scale)


def optimal_alie(G_benign, n_byz, aggregator, *, evals: int = 20, start: float = 0.0, delta: float = 10.0,
                 ratio: float = 0.8, pre=()):
    r"""ALIE with a searched $z$: every row is ``lie(G_benign, n_byz, z)``, $\mu - z\sigma$ (Baruch
    et al. 2019), with $z$ the ``optimal_scale`` line search's best against ``aggregator``; as
    ``optimal_ipm`` otherwise. Needs at least 2 benign rows.

    ByzFL's ``Optimal_ALittleIsEnough`` sends $\mu + \tau\sigma$, so its tau is our $-z$: ByzFL
    with (start, delta) is ours with (-start, -delta), the same evals and ratio. The same defaults
    search opposite directions (ours towards $\mu - z\sigma$, z > 0, as in the paper)."""
    found = _line_search(G_benign, n_byz, lie, aggregator, evals, start, delta, ratio, pre,
                         "optimal_alie")
    return lie(G_benign, n_byz, found.scale)


def _check_byzantine(byzantine, n: int) -> list[int]:
    if isinstance(byzantine, (str, bytes)) or not hasattr(byzantine, "__iter__"):
        raise TypeError(f"apply: byzantine must be a sequence of client indices, got {byzantine!r}")
    byzantine = list(byzantine)
    for i in byzantine:
        if isinstance(i, bool) or not isinstance(i, numbers.Integral) or not 0 <= i < n:
            raise ValueError(f"apply: byzantine holds {i!r}; client indices must be ints in [0, {n - 1}] "
                             f"for n={n} clients")
    repeated = sorted({i for i in byzantine if byzantine.count(i) > 1})
    if repeated:
        raise ValueError(f"apply: byzantine lists clients {repeated} more than once; each index must be distinct")
    if len(byzantine) == n:
        raise ValueError(f"apply: byzantine lists all n={n} clients; the attack needs at least 1 honest client")
    return [int(i) for i in byzantine]


def apply(updates, byzantine, attack, **params):
    r"""The clients' updates with those listed in ``byzantine`` replaced by the attack.

    ``updates`` is any structure the aggregators take (an (n, d) matrix, a list of vectors, of
    parameter lists or of state_dicts, torch or NumPy), and the result is the same structure.
    ``attack(G_honest, len(byzantine), **params)`` sees the flattened updates of the other
    clients, and its k-th row becomes the update of client ``byzantine[k]``. The honest clients'
    updates come back as they were given. The attack acts on the floating entries, BatchNorm
    buffers included; integer entries (counters) keep the values each Byzantine client sent.
    """
    if not callable(attack):
        raise TypeError(f"apply: attack must be a function (G_benign, n_byz, **params), got {attack!r}")
    G, layout = flatten(updates, hold_out=lambda key, t: is_integer(t.dtype))
    n = G.shape[0]
    byzantine = _check_byzantine(byzantine, n)
    attacked = set(byzantine)
    honest = [i for i in range(n) if i not in attacked]
    rows = attack(G[honest], len(byzantine), **params)
    if not isinstance(rows, torch.Tensor) or tuple(rows.shape) != (len(byzantine), G.shape[1]):
        got = tuple(rows.shape) if isinstance(rows, torch.Tensor) else type(rows).__name__
        raise ValueError(f"apply: {getattr(attack, '__name__', attack)!r} returned {got}; an attack must return "
                         f"({len(byzantine)}, {G.shape[1]}) rows, one per Byzantine client")
    rows = rows.to(dtype=G.dtype, device=G.device)
    if layout.kind == "tensor":
        out = G.clone()
        out[byzantine] = rows
        return out.cpu().numpy() if layout.numpy else out
    out = list(updates)
    for k, i in enumerate(byzantine):
        out[i] = layout.unflatten(rows[k], {key: value[i] for key, value in layout.held.items()})
    return out


ATTACKS = {f.__name__: f for f in (lie, byzmean, min_max, min_sum, sign_flip, gaussian, noise, ipm, scaling,
                                   nan_inject, mimic)}
# Attacks that need the aggregator they attack: attack(G_benign, n_byz, aggregator, **params).
ADAPTIVE_ATTACKS = {f.__name__: f for f in (optimal_ipm, optimal_alie)}
