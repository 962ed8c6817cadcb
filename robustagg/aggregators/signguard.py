"""SignGuard (seed defense): norm filtering plus clustering of sign statistics."""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import sklearn
import torch
from sklearn.cluster import MeanShift, estimate_bandwidth
from threadpoolctl import threadpool_limits   # installed with scikit-learn, which depends on it

from .. import ops
from .base import Aggregator, Clients, Report, check_choice, check_float, make_generator
from .classic import clip_factor


@dataclass
class SignGuardReport(Report):
    window: tuple[int, int] = (0, 0)          # (start, length) of the sign-statistics window
    norm_passed: list[int] = field(default_factory=list)      # S1
    cluster_passed: list[int] = field(default_factory=list)   # S2
    cluster_sizes: list[int] = field(default_factory=list)    # per MeanShift label; orphans excluded
    bandwidth: float = 0.0


def mean_shift_labels(F: np.ndarray) -> tuple[np.ndarray, float]:
    """MeanShift labels of the feature rows, as SignGuard's released code clusters them.

    Identical rows or a zero bandwidth put every client in cluster 0. Orphans get -1.
    """
    if F.shape[0] == 1 or bool((F == F[0]).all()):
        return np.zeros(F.shape[0], dtype=np.int64), 0.0
    # One OpenMP thread and no input re-validation: on a few dozen points, sklearn's threaded
    # neighbour searches cost more in thread wake-ups than in arithmetic (on a loaded 2-core CPU,
    # 300 ms instead of 20 ms). The features are finite by construction; the result is the same.
    with threadpool_limits(limits=1, user_api="openmp"), sklearn.config_context(assume_finite=True):
        bandwidth = float(estimate_bandwidth(F, quantile=0.5, n_samples=50, random_state=0))
        if not bandwidth > 0:
            return np.zeros(F.shape[0], dtype=np.int64), bandwidth
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # sklearn warns when bin seeding finds a single seed
            labels = MeanShift(bandwidth=bandwidth, bin_seeding=True, cluster_all=False).fit(F).labels_
    return labels.astype(np.int64), bandwidth


def largest_cluster(labels: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """The members of the largest cluster (ties to the lowest label) and every cluster's size."""
    sizes = np.bincount(labels[labels >= 0]) if (labels >= 0).any() else np.zeros(0, dtype=np.int64)
    if sizes.size == 0:
        return np.zeros(labels.shape[0], dtype=bool), []
    return labels == int(np.argmax(sizes)), sizes.tolist()


def median_off_diagonal(M: torch.Tensor) -> torch.Tensor:
    """Per row, the numpy-style median of the entries j != i."""
    n = M.shape[0]
    if n == 1:
        return torch.zeros(1, dtype=M.dtype)
    off = M[~torch.eye(n, dtype=torch.bool)].reshape(n, n - 1)
    return off.quantile(0.5, dim=1)


class SignGuard(Aggregator):
    r"""SignGuard (Xu et al., ICDCS 2022).

    1. Norm filter $S_1$: keep $\mathrm{lower} < \|g_i\|/\mathrm{med} < \mathrm{upper}$ (strict),
       med the numpy-style median of the norms.
    2. Sign features on one column window of length ``int(window_frac*d)`` (at least 1), shared
       by all clients; its start comes from ``generator``/``seed``. Features are the fractions of
       positive, zero and negative entries. The authors' code divides each feature by its
       maximum over clients (+1e-8): ``normalize_features=True``.
    3. ``MeanShift(bandwidth=estimate_bandwidth(F, quantile=0.5, n_samples=50, random_state=0),
       bin_seeding=True, cluster_all=False)``; the largest cluster is $S_2$ (ties to the lowest
       label). Identical features or a zero bandwidth make one cluster.
    4. Output $\frac{1}{|S|}\sum_{i \in S} g_i \min(1, c/\|g_i\|)$ with $S = S_1 \cap S_2$ and c the
       lower-middle median of all norms.

    ``variant="sim"`` adds a fourth feature, the median cosine of g_i to the other clients;
    ``variant="dist"`` the median L2 distance to the other clients (the authors' SignGuard-Sim and
    -Dist use a similarity / distance feature; this stateless per-client median is our choice of
    reference point). Ignores weights.
    """

    def __init__(self, lower: float = 0.1, upper: float = 3.0, window_frac: float = 0.1, variant: str = "plain",
                 normalize_features: bool = True, *, generator=None, seed=None, **kw):
        super().__init__(**kw)
        self.lower = check_float(self.name, "lower", lower, 0.0)
        self.upper = check_float(self.name, "upper", upper, self.lower, lo_open=True)
        self.window_frac = check_float(self.name, "window_frac", window_frac, 0.0, 1.0, lo_open=True)
        self.variant = check_choice(self.name, "variant", variant, ("plain", "sim", "dist"))
        self.normalize_features = bool(normalize_features)
        self.generator = make_generator(generator, seed)

    def window(self, d: int) -> tuple[int, int]:
        length = max(1, int(self.window_frac * d))
        start = int(torch.randint(0, d - length + 1, (1,), generator=self.generator))
        return start, length

    def features(self, rows: Clients, sign_frac: torch.Tensor) -> np.ndarray:
        F = sign_frac.double().cpu()
        if self.variant == "sim":
            F = torch.cat([F, median_off_diagonal(rows.pairwise(ops.pairwise_cosine).double().cpu())[:, None]], 1)
        elif self.variant == "dist":
            D = rows.pairwise(ops.pairwise_sqdist).double().cpu().clamp_min(0).sqrt()
            F = torch.cat([F, median_off_diagonal(D)[:, None]], 1)
        if self.normalize_features:
            F = F / (F.max(dim=0).values + 1e-8)
        return F.numpy()

    def aggregate(self, rows: Clients, layout):
        window = self.window(rows.d)
        stats = rows.stats(window=window)   # norms over all of d, signs in the window; screens the rows
        F = self.features(rows, stats.sign_frac)
        norm = stats.norm.double().cpu()
        ratio = norm / norm.quantile(0.5)
        norm_ok = (ratio > self.lower) & (ratio < self.upper)                     # step 1, S1
        labels, bandwidth = mean_shift_labels(F)
        in_cluster, sizes = largest_cluster(labels)                                # step 3, S2
        chosen = norm_ok & torch.from_numpy(in_cluster)
        count = int(chosen.sum())
        coef = chosen.double() * clip_factor(norm, norm.median()) / max(count, 1)  # step 4, clipped mean
        out = rows.combine(coef)
        return out, SignGuardReport(selected=rows.ids(chosen), window=window, norm_passed=rows.ids(norm_ok),
                                    cluster_passed=rows.ids(torch.from_numpy(in_cluster)), cluster_sizes=sizes,
                                    bandwidth=bandwidth)
