"""Krum, MultiKrum, MultiKrumCos and Bulyan (robustagg/aggregators/krum.py) against plainly written
float64 versions of the papers' selection rules, plus ties and a hand-checkable case."""
import numpy as np
import pytest
import torch
from aggregator_formulas import T, X64, close, rand_G
from conftest import DEVICE

from robustagg import aggregators as A


# ---------------------------------------------------------------- float64 paper formulas

def krum_scores_ref(G, f):
    n = G.shape[0]
    scores = []
    for i in range(n):
        dist = sorted(float(((G[i] - G[j]) ** 2).sum()) for j in range(n) if j != i)
        scores.append(sum(dist[:n - f - 2]))
    return torch.tensor(scores, dtype=torch.float64)


def multikrum_ref(G, f, m, cosine=False):
    if cosine:
        Gn = G / G.norm(dim=1, keepdim=True)
        n = G.shape[0]
        D = 1 - Gn @ Gn.T
        scores = torch.tensor([sorted(D[i, j].item() for j in range(n) if j != i)[:n - f - 2] for i in range(n)]).sum(1)
    else:
        scores = krum_scores_ref(G, f)
    order = sorted(range(G.shape[0]), key=lambda i: (scores[i].item(), i))[:m]
    return G[sorted(order)].mean(0), sorted(order)


def bulyan_ref(G, f):
    n = G.shape[0]
    remaining, picked = list(range(n)), []
    for _ in range(n - 2 * f):
        sub = G[remaining]
        r = len(remaining)
        k = max(r - f - 2, 0)
        scores = [sum(sorted(float(((sub[i] - sub[j]) ** 2).sum()) for j in range(r) if j != i)[:k]) for i in range(r)]
        best = min(range(r), key=lambda i: (scores[i], i))
        picked.append(remaining.pop(best))
    P = G[sorted(picked)]
    beta = n - 4 * f
    med = torch.from_numpy(np.median(P.numpy(), axis=0))
    out = torch.empty(G.shape[1], dtype=torch.float64)
    for j in range(G.shape[1]):
        order = sorted(range(P.shape[0]), key=lambda i: (abs(P[i, j].item() - med[j].item()), i))[:beta]
        out[j] = P[order, j].mean()
    return out, sorted(picked)


# ---------------------------------------------------------------- random inputs vs the formulas

@pytest.mark.parametrize("n,f", [(7, 2), (20, 4), (33, 10)])
def test_krum_picks_the_lowest_score(n, f):
    G = rand_G(n, 16, seed=n)
    agg = A.Krum(f)
    out = agg(G)
    scores = krum_scores_ref(X64(G), f)
    best = min(range(n), key=lambda i: (scores[i].item(), i))
    close(out, X64(G)[best])
    assert agg.last_report.selected == [best]
    close(torch.tensor([agg.last_report.scores[i] for i in range(n)], dtype=torch.float64), scores)


@pytest.mark.parametrize("cosine", [False, True])
@pytest.mark.parametrize("n,f,m", [(9, 2, None), (20, 4, 5)])
def test_multikrum_averages_the_m_best(n, f, m, cosine):
    G = rand_G(n, 24, seed=n + 1)
    agg = (A.MultiKrumCos if cosine else A.MultiKrum)(f, m)
    expected, chosen = multikrum_ref(X64(G), f, m if m is not None else n - f, cosine)
    close(agg(G), expected)
    assert agg.last_report.selected == chosen


def test_krum_ties_go_to_the_lower_index():
    G = torch.tensor([[1.0], [0.0], [0.0], [1.0], [5.0]], dtype=torch.float64, device=DEVICE)
    agg = A.Krum(0)
    agg(G)
    assert agg.last_report.selected == [0]   # rows 0 and 3 tie at score 1 (n-f-2 = 3 neighbours)


@pytest.mark.parametrize("n,f", [(7, 1), (11, 2), (15, 3)])
def test_bulyan_matches_the_paper(n, f):
    G = rand_G(n, 12, seed=n)
    agg = A.Bulyan(f)
    expected, picked = bulyan_ref(X64(G), f)
    close(agg(G), expected)
    assert agg.last_report.selected == picked and agg.last_report.beta == n - 4 * f


# ---------------------------------------------------------------- hand-checkable cases

def test_hand_krum():
    # scores with n-f-2 = 2 neighbours: row0 1+4, row1 1+1, row2 1+4, rows 3/4 huge
    agg = A.Krum(1)
    assert agg(T([[0.0], [1.0], [2.0], [100.0], [101.0]])).tolist() == [1.0]
    assert agg.last_report.scores[1] == 2.0
