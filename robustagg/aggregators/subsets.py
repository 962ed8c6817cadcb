"""Rules that average one chosen subset of the clients: minimum-diameter averaging (MDA) and the
nearest neighbours of a trusted client (MoNNA)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .. import ops
from .base import Aggregator, Clients, Report, check_int, check_majority_f, mean_of, ranking_key


# ---------------------------------------------------------------- MDA's exact subset search
#
# The optimal diameter is one of the pairwise distances t. For a candidate t, call two clients in
# conflict when their distance exceeds t: a subset of n - f clients of diameter <= t exists iff
# removing at most f clients leaves no conflict, i.e. iff the conflict graph has a vertex cover of
# size <= f. That test branches on the client u with the most conflicts: remove u, or keep u and
# remove all its conflicting clients. While some client has >= 2 conflicts the branches cost 1 and
# >= 2 removals (a Fibonacci-sized tree, at most F(f+2) leaves); when every client has at most one,
# the conflicts are disjoint pairs and need one removal each. Each leaf is a distinct removal set
# of at most f clients, so the tree is also no larger than the number of such sets.
# Clients are bits of Python ints: ``conflicts[i]`` holds bit j when i and j conflict.

def conflict_masks(D: torch.Tensor, t: float) -> list[int]:
    over = (D > t).tolist()
    return [sum(1 << j for j, hit in enumerate(row) if hit) for row in over]


def fits(conflicts: list[int], budget: int, alive: int) -> bool:
    """Whether removing at most ``budget`` of the ``alive`` clients leaves no conflict among them."""
    best, most, edges = -1, 0, 0
    rest = alive
    while rest:
        u = (rest & -rest).bit_length() - 1
        rest &= rest - 1
        degree = (conflicts[u] & alive).bit_count()
        edges += degree
        if degree > most:
            best, most = u, degree
    if most == 0:
        return True
    if most == 1:               # disjoint conflicting pairs: one removal each
        return edges // 2 <= budget
    if budget == 0:
        return False
    others = conflicts[best] & alive
    return (fits(conflicts, budget - 1, alive & ~(1 << best))
            or (others.bit_count() <= budget and fits(conflicts, budget - others.bit_count(), alive & ~others)))


def fits_with(conflicts: list[int], f: int, n: int, kept: int, removed: int) -> bool:
    """``fits`` for a subset that must hold every client of ``kept`` and none of ``removed``."""
    forced = removed
    for u in range(n):
        if kept >> u & 1:
            forced |= conflicts[u]
    if forced & kept or forced.bit_count() > f:
        return False
    return fits(conflicts, f - forced.bit_count(), ((1 << n) - 1) & ~forced)


def search_bound(n: int, f: int) -> int:
    """Leaves of one exact test's branching tree, at most: min(F(f+2), sum_{j<=f} C(n, j))."""
    a, b = 1, 1            # F(1), F(2)
    for _ in range(f):
        a, b = b, a + b
    return min(b, sum(math.comb(n, j) for j in range(f + 1)))


def minimum_diameter_subset(D: torch.Tensor, f: int) -> tuple[list[int], float]:
    """The lexicographically smallest set of n - f positions among those of least diameter (the
    largest entry of the [n, n] distance matrix D between two of them), and that diameter."""
    n = D.shape[0]
    D = torch.maximum(D, D.T)   # the conflict graph must be undirected, whatever rounding made D
    if f == 0:
        return list(range(n)), float(D.max())
    pairs = torch.triu_indices(n, n, offset=1)
    candidates = torch.unique(D[pairs[0], pairs[1]]).tolist()     # ascending
    everyone = (1 << n) - 1
    lo, hi = 0, len(candidates) - 1                                 # the largest always fits
    while lo < hi:                                                  # the least t that fits
        mid = (lo + hi) // 2
        if fits(conflict_masks(D, candidates[mid]), f, everyone):
            hi = mid
        else:
            lo = mid + 1
    t = candidates[lo]
    conflicts = conflict_masks(D, t)
    kept = removed = 0
    for u in range(n):       # keep each client in turn while a subset of diameter t still can
        if kept.bit_count() == n - f:
            break
        if fits_with(conflicts, f, n, kept | 1 << u, removed):
            kept |= 1 << u
        else:
            removed |= 1 << u
    return [u for u in range(n) if kept >> u & 1], t


@dataclass
class MDAReport(Report):
    diameter: float = 0.0   # the largest L2 distance between two selected clients


class MDA(Aggregator):
    r"""Minimum-diameter averaging (El Mhamdi, Guerraoui & Rouault, ICML 2018, after Rousseeuw's
    minimum-volume ellipsoid): the mean of the $n - f$ clients of least diameter,

    $$S^\star = \operatorname*{arg\,min}_{|S| = n-f} \max_{i,j \in S} \|g_i - g_j\|, \qquad
    \mathrm{MDA}_f = \frac{1}{n-f} \sum_{i \in S^\star} g_i .$$

    Among subsets of equal diameter the lexicographically smallest set of client indices wins
    (ByzFL's first in ``itertools.combinations`` order, the same set). The search is exact: the
    pairwise distance matrix is computed once (one pass over G), and each candidate diameter,
    found by bisection over the pairwise distances, is tested by a vertex-cover branching on that
    n x n matrix, whose tree has at most $\min(F_{f+2}, \sum_{j \le f}\binom{n}{j})$ leaves; about
    $n + \log_2 n^2$ tests run. When that bound exceeds ``max_branches`` (default $2^{16}$: every
    f <= 22 at any n) the call raises a ``ValueError`` naming n, f and the subset count.

    Requires n >= 2f+1 (as ByzFL). Ignores weights. The mean is one more pass over G.

    Distances are the squared ones of ``ops.pairwise_sqdist`` (the same order as ByzFL's L2
    distances); for float32 rows beyond ~1.8e19 apart they overflow to Inf, so pairs that far are
    ranked as equal, and such clients are left out whenever f allows it.
    """

    max_branches_default = 1 << 16

    def __init__(self, f: int, max_branches: int = max_branches_default, **kw):
        super().__init__(**kw)
        self.f = check_int(self.name, "f", f, 0)
        self.max_branches = check_int(self.name, "max_branches", max_branches, 1)

    def check_n(self, n):
        check_majority_f(self.name, self.f, n)

    def check_search(self, n):
        bound = search_bound(n, self.f)
        if bound > self.max_branches:
            raise ValueError(f"{self.name}: n={n} clients with f={self.f} give C({n}, {n - self.f}) = "
                             f"{math.comb(n, self.f)} subsets of n - f = {n - self.f} clients, and one exact test "
                             f"may branch {bound} times, over max_branches={self.max_branches}; raise "
                             "max_branches, or use a rule of polynomial cost (MultiKrum, Bulyan, MoNNA)")

    def aggregate(self, rows: Clients, layout):
        D = rows.pairwise(ops.pairwise_sqdist).double().cpu()
        self.check_n(rows.n)
        self.check_search(rows.n)
        chosen, diameter = minimum_diameter_subset(D, self.f)
        chosen = torch.tensor(chosen)
        return mean_of(rows, chosen), MDAReport(selected=rows.ids(chosen), diameter=math.sqrt(diameter))


class MoNNA(Aggregator):
    r"""Nearest-neighbour averaging around a trusted client (Farhadkhani, Guerraoui, Gupta, Hoang,
    Pinot & Stephan, "Robust Collaborative Learning with Linear Gradient Overhead", ICML 2023):

    $$\mathrm{MoNNA}_{f,\mathrm{idx}} = \frac{1}{n-f} \sum_{i \in N_{\mathrm{idx}}} g_i,$$

    where $N_{\mathrm{idx}}$ is the $n - f$ clients nearest (in L2) to client ``idx``, ``idx``
    itself first. Ties in distance go to the lower client index (ByzFL's ``argpartition`` leaves
    them unspecified). ``idx`` is the caller's client number; the paper's setting is peer-to-peer,
    where each honest node is its own trusted client.

    The distances come from one ``client_stats`` pass with the trusted row as the reference, and
    the mean from one more. Requires n >= 2f+1 and idx < n (as ByzFL). If the trusted client's
    update holds NaN or Inf there is no point to measure from: under ``nonfinite="raise"`` this is
    ``NonFiniteUpdateError``, and under ``"drop"`` or ``"propagate"`` a ``ValueError`` naming idx.
    Other non-finite clients are dropped as usual, and f applies to the n' clients left.
    Ignores weights.
    """

    def __init__(self, f: int, idx: int = 0, **kw):
        super().__init__(**kw)
        self.f = check_int(self.name, "f", f, 0)
        self.idx = check_int(self.name, "idx", idx, 0)

    def check_n(self, n):
        if self.idx >= n:
            raise ValueError(f"{self.name}: idx={self.idx} is not a client of n={n}; idx must be in [0, {n - 1}]")
        check_majority_f(self.name, self.f, n)

    def aggregate(self, rows: Clients, layout):
        trusted = rows.G[self.idx]
        trusted_bad = ~ops.client_stats(trusted[None, :], nonfinite="propagate", backend=self.backend).finite
        if bool(rows.agree(trusted_bad)[0]):
            if self.nonfinite == "raise":
                rows.stats()   # raises NonFiniteUpdateError listing every non-finite client
            raise ValueError(f"{self.name}: the trusted client idx={self.idx} sent NaN or Inf, so there is no "
                             "point to measure the neighbours from; pass the index of a client whose update "
                             "is finite")
        dist = rows.stats(ref=trusted).ref_dist.double().cpu()     # ||g_i - g_idx||, one pass
        check_majority_f(self.name, self.f, rows.n)
        # the trusted client is its own nearest neighbour, ahead of any exact copy of it
        dist[rows.all_ids().index(self.idx)] = -1.0
        nearest = torch.sort(ranking_key(dist), stable=True).indices[:rows.n - self.f].sort().values
        return mean_of(rows, nearest), Report(selected=rows.ids(nearest))
