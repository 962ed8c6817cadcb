"""SignGuard (robustagg/aggregators/signguard.py) against its steps written out in float64 with
scikit-learn's MeanShift, for every variant."""
import math

import numpy as np
import pytest
import torch
from aggregator_formulas import X64, close, rand_G
from conftest import DEVICE
from sklearn.cluster import MeanShift, estimate_bandwidth

from robustagg import aggregators as A


# ---------------------------------------------------------------- float64 paper formulas

def signguard_ref(G, start, length, lower=0.1, upper=3.0, feature=None):
    norm = G.norm(dim=1)
    med = float(np.median(norm.numpy()))
    s1 = [(lower < float(x) / med < upper) for x in norm]
    win = G[:, start:start + length]
    F = np.stack([(win > 0).double().mean(1).numpy(), (win == 0).double().mean(1).numpy(),
                  (win < 0).double().mean(1).numpy()], axis=1)
    if feature is not None:
        F = np.concatenate([F, feature[:, None]], axis=1)
    F = F / (F.max(axis=0) + 1e-8)
    if (F == F[0]).all():
        labels = np.zeros(len(F), dtype=int)
    else:
        bw = estimate_bandwidth(F, quantile=0.5, n_samples=50, random_state=0)
        labels = np.zeros(len(F), dtype=int) if bw <= 0 else \
            MeanShift(bandwidth=bw, bin_seeding=True, cluster_all=False).fit(F).labels_
    counts = {lab: int((labels == lab).sum()) for lab in set(labels.tolist()) if lab >= 0}
    winner = min(counts, key=lambda lab: (-counts[lab], lab))
    chosen = [i for i in range(G.shape[0]) if s1[i] and labels[i] == winner]
    c = float(torch.sort(norm).values[(G.shape[0] - 1) // 2])
    rows = [G[i] * min(1.0, c / float(norm[i])) for i in chosen]
    return torch.stack(rows).mean(0), chosen


# ---------------------------------------------------------------- random inputs vs the formulas

@pytest.mark.parametrize("variant", ["plain", "sim", "dist"])
def test_signguard_matches_the_steps(variant):
    G = rand_G(20, 500, seed=3, shift=0.05)
    G[[2, 9, 14]] = -3 * G[[2, 9, 14]].abs()          # different signs and larger norms
    G[5] *= 10                                         # fails the norm filter
    agg = A.SignGuard(variant=variant, seed=11)
    out = agg(G)
    length = int(0.1 * 500)
    start = int(torch.randint(0, 500 - length + 1, (1,), generator=torch.Generator().manual_seed(11)))
    X = X64(G)
    feature = None
    if variant == "sim":
        Xn = X / X.norm(dim=1, keepdim=True)
        C = Xn @ Xn.T
        feature = np.array([np.median(np.delete(C[i].numpy(), i)) for i in range(20)])
    elif variant == "dist":
        D = torch.cdist(X, X)
        feature = np.array([np.median(np.delete(D[i].numpy(), i)) for i in range(20)])
    expected, chosen = signguard_ref(X, start, length, feature=feature)
    assert agg.last_report.window == (start, length)
    assert agg.last_report.selected == chosen
    close(out, expected)
    assert 5 not in chosen and not {2, 9, 14} & set(chosen)


def test_signguard_identical_features_form_one_cluster():
    G = torch.ones(6, 40, dtype=torch.float64, device=DEVICE) * torch.arange(1, 7, dtype=torch.float64,
                                                                               device=DEVICE)[:, None]
    agg = A.SignGuard(lower=0.0, upper=100.0)
    out = agg(G)
    assert agg.last_report.cluster_sizes == [6] and agg.last_report.bandwidth == 0.0
    # c = lower-middle median norm = norm of row 3: rows 4..6 are clipped to it
    c = 3 * math.sqrt(40)
    expected = torch.stack([X64(G)[i] * min(1, c / X64(G)[i].norm().item()) for i in range(6)]).mean(0)
    close(out, expected)
