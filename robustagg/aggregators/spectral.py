r"""Spectral filters: CAF (Allouah, Guerraoui & Stephan, ICML 2025) and SMEA (Allouah et al., ICML 2023).

Both judge a set of clients by the largest eigenvalue of its empirical covariance. Neither forms a
d x d matrix: for $Y = \mathrm{diag}(\sqrt{c})(X - \mathbf{1}\mu^\top)$ the nonzero eigenvalues of
$Y^\top Y$ are those of the n x n matrix $Y Y^\top$, and its top eigenvector is $Y^\top u$ for the
top eigenvector $u$ of $Y Y^\top$ (``torch.linalg.eigh`` in float64 on n x n).

The n x n Gram matrices come from one pass over the rows read, centered explicitly around an
explicit [d] point (``scaled_gram``), never from a raw Gram or from distances by algebra: with one
client at 1e30 a raw Gram holds 1e60 next to the honest entries of order 1, and centering it by
algebra leaves rounding noise of order 1e44 in place of the honest block. Each row is scaled by a
power of two (exact), so that a float64 client of 1e300 neither overflows the products nor makes
the honest rows' products underflow.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import torch

from .. import ops
from .base import Aggregator, Clients, Report, check_int, check_majority_f, mean_of

# Columns of G per block of the Gram pass: a block of n rows is n x GRAM_BLOCK // n float64 values (32 MiB).
GRAM_BLOCK = 1 << 22
# Eigenvalues within this relative distance of the smallest, and CAF's scores within it of the
# largest, count as tied (the tie rules below). Far above the rounding of the float64 Gram pass
# and the n x n eigensolver (O(n^2 eps) + O(d eps) in the worst case), so ties by symmetry stay
# ties whatever the summation order.
TIE_RTOL = 2.0 ** -30
LOG2_TIE = math.log2(1 + TIE_RTOL)


def scale_exponents(norms: torch.Tensor, center_norm: float) -> torch.Tensor:
    r"""Per row, the integer $e_i$ with $\|x_i - z\| \cdot 2^{-e_i} < 1$ for the center $z$ (from the
    float64 row norms and $\|z\|$, as $\|x_i - z\| \le 2\max(\|x_i\|, \|z\|)$).

    The bound can exceed $\|x_i - z\|$ by much only where $x_i$ and $z$ agree in their leading
    digits, and there float64 subtraction loses those digits anyway; the scaled products stay far
    above the underflow threshold (2^-1022) for any difference float64 can resolve."""
    bound = norms.double().cpu().clamp_min(center_norm)
    return torch.frexp(bound).exponent.to(torch.int64) + 1


def scaled_gram(rows: Clients, local: torch.Tensor, center: torch.Tensor, exponents: torch.Tensor) -> torch.Tensor:
    r"""$K_{ij} = 2^{-e_i - e_j} (x_i - z)\cdot(x_j - z)$ over the local rows ``local``, float64 on
    the CPU, in one pass over those rows of G.

    The rows are centered explicitly, block of columns by block of columns (so that memory stays
    n x GRAM_BLOCK/n whatever d is), scaled by $2^{-e_i}$, and each block adds its (k x b)(b x k)
    product (summed over the column shards of a sharded G)."""
    G = rows.G
    index = rows.rows_of(local)
    k = index.numel()
    step = max(1, GRAM_BLOCK // k)
    shift = (-exponents).to(device=G.device, dtype=torch.int32)[:, None]
    center = center.to(device=G.device, dtype=torch.float64)
    K = torch.zeros(k, k, dtype=torch.float64, device=G.device)
    for start in range(0, G.shape[1], step):   # blocks of columns, not coordinates
        Y = torch.ldexp(G[index, start:start + step].double() - center[start:start + step], shift)
        K.addmm_(Y, Y.T)
    return rows.gram_total(K).cpu()


def unscaled(exponents: torch.Tensor) -> torch.Tensor:
    """2^(e_i - max e) per row: the factors that put scaled Gram entries back on one common scale."""
    return torch.ldexp(torch.ones(exponents.shape, dtype=torch.float64), (exponents - exponents.max()).to(torch.int32))


# ---------------------------------------------------------------- CAF

@dataclass
class CAFReport(Report):
    eigenvalues: list[float] = field(default_factory=list)   # per iteration: lambda_max(Sigma_c)
    best_iteration: int | None = None                         # the iteration whose mean is returned
    weights: dict[int, float] = field(default_factory=dict)   # client -> c_i at the best iteration


class CAF(Aggregator):
    r"""Covariance-bound Agnostic Filter (Allouah, Guerraoui & Stephan, "Towards Trustworthy
    Federated Learning with Untrusted Participants", ICML 2025, Alg. 2), a weighted filter in the
    line of Diakonikolas et al.

    Start from $c_i = 1$. While $\sum_i c_i > n - 2f$:

    .. math::
        \mu_c = \frac{\sum_i c_i x_i}{\sum_i c_i},\qquad
        \Sigma_c = \frac{\sum_i c_i (x_i - \mu_c)(x_i - \mu_c)^\top}{\sum_i c_i},\qquad
        (\lambda, v) = \text{top eigenpair of } \Sigma_c,

    $\tau_i = ((x_i - \mu_c)^\top v)^2$ and $c_i \leftarrow c_i (1 - \tau_i / \tau_{\max})$ with
    $\tau_{\max} = \max_{j : c_j > 0} \tau_j$. The output is the $\mu_c$ of the iteration with the
    smallest $\lambda$; eigenvalues within a relative ``TIE_RTOL`` (2^-30) of the smallest so far
    count as tied, and the earlier iteration wins. Every iteration zeroes the weight of the client
    with the largest score, so the loop runs at most 2f times. When $\lambda = 0$ (the weighted
    clients coincide) no later iteration can do better and the loop stops. With f = 0 the loop
    never runs and the output is the mean. Needs 2f < n. Ignores weights.

    Cost per iteration: two passes over the clients still weighted (the weighted mean, then the
    explicitly centered Gram matrix, ``scaled_gram``), and an n x n ``eigh``; plus one pass at the
    start (the row norms, which also screen NaN/Inf rows). When the top eigenvalue is repeated, v
    is the vector of that eigenspace that LAPACK returns.

    Differences from ByzFL's ``CAF``: ByzFL takes $\tau_{\max}$ over all n clients, those already
    at weight 0 included; when such a client stays the farthest along v, the step barely changes
    the others' weights (a client at 1e6 with honest spread 1 makes ByzFL run for minutes, one at
    1e300 makes the step a no-op and the loop endless). ByzFL estimates v and $\lambda$ with one
    power-method step from a random start, so its $\lambda$ is a random underestimate and its
    choice of iteration is random; here both are exact. With f = 0 ByzFL returns None.
    """

    def __init__(self, f: int, **kw):
        super().__init__(**kw)
        self.f = check_int(self.name, "f", f, 0)

    def check_n(self, n):
        check_majority_f(self.name, self.f, n)

    def aggregate(self, rows: Clients, layout):
        norms = rows.stats().norm.double().cpu()   # screens NaN/Inf rows
        self.check_n(rows.n)
        n = rows.n
        c = torch.ones(n, dtype=torch.float64)
        report = CAFReport()
        best_key, best_mean, best_c = math.inf, None, c
        while float(c.sum()) > n - 2 * self.f:
            support = (c > 0).nonzero().flatten()
            mean = rows.weighted_mean(c)
            exponents = scale_exponents(norms[support], rows.norm(mean))
            K = scaled_gram(rows, support, mean, exponents)
            factor = unscaled(exponents)
            w = c[support].sqrt() * factor
            # D K D / 2^(2 max e): the weighted Gram, on the scale of its largest row
            eigenvalues, eigenvectors = torch.linalg.eigh(w[:, None] * K * w[None, :])
            lam, u = float(eigenvalues[-1].clamp_min(0)), eigenvectors[:, -1]
            top = int(exponents.max())
            key = math.log2(lam) + 2 * top - math.log2(float(c.sum())) if lam > 0 else -math.inf
            report.eigenvalues.append(float(torch.ldexp(torch.tensor(lam / float(c.sum()), dtype=torch.float64),
                                                        torch.tensor(2 * top))))
            if key < best_key - LOG2_TIE:
                best_key, best_mean, best_c = key, mean, c.clone()
                report.best_iteration = len(report.eigenvalues) - 1
            if lam == 0:
                break
            # (x_i - mu) . Y^T u over the support, on the common scale: K_ij 2^(e_i+e_j-2 max e) (w u)_j.
            # Computed from K rather than as lambda u_i^2 / c_i, which loses u_i's accuracy for small c_i.
            projection = factor * (K @ (w * u))
            # Clients tied for the largest score all reach weight 0, as in exact arithmetic: rounding
            # leaves tied scores an ulp apart, and a weight of 1e-16 left on one would spend the next
            # step on it.
            tau = projection ** 2
            share = tau / tau.max()
            share[share >= 1 - TIE_RTOL] = 1.0
            c[support] = (c[support] * (1 - share)).clamp_min(0)
        if best_mean is None:   # f = 0: nothing to filter
            best_mean = rows.weighted_mean(c)
        report.selected = rows.ids(best_c > 0)
        report.weights = dict(zip(report.selected, best_c[best_c > 0].tolist()))
        return best_mean, report


# ---------------------------------------------------------------- SMEA

@dataclass
class SMEAReport(Report):
    eigenvalue: float = 0.0   # lambda_max of the chosen subset's covariance
    subsets: int = 0          # subsets searched, C(n, f)


class SMEA(Aggregator):
    r"""Smallest Maximum Eigenvalue Averaging (Allouah, Guerraoui, Gupta, Pinot & Stephan, "On the
    Privacy-Robustness-Utility Trilemma in Distributed Learning", ICML 2023):

    .. math::
        S^\star = \arg\min_{|S| = n - f} \lambda_{\max}\Big(\frac{1}{|S|}\sum_{i\in S}
        (x_i - \bar x_S)(x_i - \bar x_S)^\top\Big), \qquad \mathrm{SMEA} = \bar x_{S^\star}.

    Exact search over all C(n, f) subsets, in lexicographic order of their sorted client indices
    (itertools.combinations). Each subset's $\lambda_{\max}$ is the top eigenvalue of its centered
    |S| x |S| Gram matrix divided by |S|, batched through ``eigvalsh``. Eigenvalues within a
    relative ``TIE_RTOL`` (2^-30) of the smallest count as tied, and the first tied subset in that
    order wins. Needs 2f < n and C(n, f) <= ``max_subsets`` (default 100000: f <= 7 at n = 20,
    f <= 4 at n = 40); beyond it a ValueError
    names n, f and the count. Ignores weights.

    Passes over G: four (row norms, which also screen NaN/Inf rows; the coordinate median; the Gram
    matrix centered at the median; the mean of $S^\star$).

    The subsets are centered inside the n x n matrix, from one Gram matrix centered explicitly at
    the coordinate median m. That is safe here: S holds more than half of the clients, so every
    coordinate of m lies within that coordinate's range over S, and $\|x_i - m\|^2$ is at most
    $|S|^2/2$ times S's squared diameter; the rounding of the subset centering is then a relative
    $O(|S|^2\varepsilon)$ of $\lambda_{\max}(S)$, which is at least a quarter of that diameter
    squared. A far client in S makes that S's eigenvalue large and accurate, and the honest
    subsets' entries never mix with it.

    Differences from ByzFL's ``SMEA``: ByzFL estimates each subset's eigenvalue with one
    power-method step from a random start (a random underestimate), so its choice is random; here
    it is exact. ByzFL keeps the first strict minimum in the same order.
    """

    def __init__(self, f: int, *, max_subsets: int = 100_000, **kw):
        super().__init__(**kw)
        self.f = check_int(self.name, "f", f, 0)
        self.max_subsets = check_int(self.name, "max_subsets", max_subsets, 1)

    def check_n(self, n):
        check_majority_f(self.name, self.f, n)
        count = math.comb(n, self.f)
        if count > self.max_subsets:
            raise ValueError(f"{self.name}: n={n}, f={self.f} gives C({n}, {self.f}) = {count} subsets of "
                             f"{n - self.f} clients to search, more than max_subsets={self.max_subsets}; "
                             f"lower f, or raise max_subsets if the time is acceptable")

    def aggregate(self, rows: Clients, layout):
        norms = rows.stats().norm.double().cpu()   # screens NaN/Inf rows
        self.check_n(rows.n)
        n, size = rows.n, rows.n - self.f
        subsets = torch.tensor(list(itertools.combinations(range(n), size)), dtype=torch.int64).reshape(-1, size)
        median = rows.run(ops.median)
        exponents = scale_exponents(norms, rows.norm(median))
        K = scaled_gram(rows, torch.arange(n), median, exponents)
        keys = torch.cat([self.log2_eigenvalues(K, exponents, chunk) for chunk in subsets.split(4096)])
        best = int(torch.argmin(keys))
        first = int((keys <= keys[best] + LOG2_TIE).nonzero()[0])
        chosen = subsets[first]
        return mean_of(rows, chosen), SMEAReport(selected=rows.ids(chosen), eigenvalue=float(torch.exp2(keys[first])),
                               subsets=subsets.shape[0])

    @staticmethod
    def log2_eigenvalues(K: torch.Tensor, exponents: torch.Tensor, subsets: torch.Tensor) -> torch.Tensor:
        r"""$\log_2 \lambda_{\max}(\Sigma_S)$ per subset (a [B, s] index tensor), from the scaled
        Gram matrix: each subset's block is put on the scale of its largest row, double-centered,
        and its top eigenvalue is shifted back by that scale ($-\infty$ for a zero covariance)."""
        scale = exponents[subsets]
        top = scale.max(dim=1, keepdim=True).values
        factor = torch.ldexp(torch.ones(scale.shape, dtype=torch.float64), (scale - top).to(torch.int32))
        block = K[subsets[:, :, None], subsets[:, None, :]] * factor[:, :, None] * factor[:, None, :]
        centered = (block - block.mean(dim=1, keepdim=True) - block.mean(dim=2, keepdim=True)
                    + block.mean(dim=(1, 2), keepdim=True))
        lam = torch.linalg.eigvalsh(centered)[:, -1].clamp_min(0)
        return torch.log2(lam) + 2 * top[:, 0].double() - math.log2(subsets.shape[1])
