"""The amplified rules of robustagg/aggregators/amplifier.py (CosDen, EuDen, MgDen, FLTrust,
FLTrustAmp) against plainly written float64 versions of their papers' formulas, plus a
hand-checkable case."""
from collections import OrderedDict

import pytest
import torch
from aggregator_formulas import T, X64, close, rand_G
from conftest import DEVICE

from robustagg import reference
from robustagg import aggregators as A
from robustagg.layout import Layout


# ---------------------------------------------------------------- float64 paper formulas

def density_ref(G, layout, kernel, k, frac, score, measure):
    n = G.shape[0]
    norm = G.norm(dim=1, keepdim=True)
    Q = reference.maxpool_amplify(G / norm, layout, kernel)
    if measure == "cos":
        Qn = Q / Q.norm(dim=1, keepdim=True)
        M, high = Qn @ Qn.T, True
    else:
        M, high = torch.cdist(Q, Q), False
    keep = round(n * (1 - frac))
    scores = []
    for i in range(n):
        nb = sorted(range(n), key=lambda j: (-M[i, j].item() if high else M[i, j].item(), j))[:k]
        scores.append(sum(M[i, j].item() for j in nb) if score == "paper" else
                      sum(M[a, b].item() for a in nb for b in nb))
    best = sorted(range(n), key=lambda i: (-scores[i] if high else scores[i], i))[:keep]
    return set(best), scores


def density_output(G, chosen, score):
    rows = sorted(chosen)
    X = G if score == "paper" else G / G.norm(dim=1, keepdim=True)
    return X[rows].mean(0)


def fltrust_ref(G, g0, pool=None):
    P, p0 = (G, g0) if pool is None else (pool(G), pool(g0[None])[0])
    cos = (P @ p0) / (P.norm(dim=1) * p0.norm())
    ts = cos.clamp_min(0)
    return (ts[:, None] * G * (g0.norm() / G.norm(dim=1))[:, None]).sum(0) / ts.sum(), ts


# ---------------------------------------------------------------- random inputs vs the formulas

@pytest.mark.parametrize("cls,measure", [(A.CosDen, ("cos",)), (A.EuDen, ("euclid",)), (A.MgDen, ("cos", "euclid"))])
@pytest.mark.parametrize("score", ["paper", "official"])
@pytest.mark.parametrize("layout", [Layout.flat(10, skip_tail=3), Layout.from_shapes([(6, 8), (8,), (3, 2, 3, 3)])])
def test_density_rules_match_the_paper(cls, measure, score, layout):
    G = rand_G(12, 110, seed=4, shift=0.2)
    G[[1, 7]] = -G[[1, 7]] * 2
    agg = cls(k_nearest=4, malicious_frac=0.25, kernel=2, score=score, layout=layout)
    out = agg(G)
    X = X64(G)
    chosen = None
    for m in measure:
        kept, scores = density_ref(X, layout, 2, 4, 0.25, score, m)
        chosen = kept if chosen is None else chosen & kept
        reported = [agg.last_report.scores[m][i] for i in range(12)]
        close(torch.tensor(reported, dtype=torch.float64), torch.tensor(scores, dtype=torch.float64), scale=10)
    assert agg.last_report.selected == sorted(chosen)
    close(out, density_output(X, chosen, score))


def test_density_default_layout_is_the_structure_of_the_updates():
    shapes = [(6, 8), (8,), (3, 2, 3, 3)]
    g = torch.Generator().manual_seed(0)
    sds = [OrderedDict((f"p{j}", torch.randn(s, generator=g, dtype=torch.float64)) for j, s in enumerate(shapes))
           for _ in range(9)]
    a = A.CosDen(k_nearest=3, malicious_frac=0.2)
    b = A.CosDen(k_nearest=3, malicious_frac=0.2, layout=Layout.from_shapes(shapes))
    out = a(sds)
    G = torch.stack([torch.cat([t.reshape(-1) for t in sd.values()]) for sd in sds])
    close(torch.cat([t.reshape(-1) for t in out.values()]), b(G))
    assert a.last_report.selected == b.last_report.selected


def test_fltrust_matches_the_paper():
    G = rand_G(10, 64, seed=8, shift=0.3)
    g0 = rand_G(1, 64, seed=9, shift=0.3)[0]
    agg = A.FLTrust(g0)
    expected, ts = fltrust_ref(X64(G), X64(g0[None])[0])
    close(agg(G), expected)
    close(torch.tensor([agg.last_report.trust[i] for i in range(10)], dtype=torch.float64), ts)


def test_fltrust_amp_uses_pooled_cosines_and_unpooled_norms():
    layout = Layout.flat(8)
    G = rand_G(10, 64, seed=8, shift=0.3)
    g0 = rand_G(1, 64, seed=9, shift=0.3)[0]
    agg = A.FLTrustAmp(g0, kernel=2, layout=layout)
    expected, ts = fltrust_ref(X64(G), X64(g0[None])[0], pool=lambda X: reference.maxpool_amplify(X, layout, 2))
    close(agg(G), expected)
    close(torch.tensor([agg.last_report.trust[i] for i in range(10)], dtype=torch.float64), ts)


def test_fltrust_all_zero_trust_gives_zeros_and_says_so():
    G = -torch.ones(4, 5, dtype=torch.float64, device=DEVICE)
    agg = A.FLTrust(torch.ones(5, dtype=torch.float64))
    assert torch.equal(agg(G), torch.zeros(5, dtype=torch.float64, device=DEVICE))
    assert agg.last_report.all_zero_trust and agg.last_report.selected == []


# ---------------------------------------------------------------- hand-checkable cases

def test_hand_fltrust():
    agg = A.FLTrust(torch.tensor([1.0, 0.0], dtype=torch.float64))
    out = agg(T([[2.0, 0.0], [0.0, 3.0], [-1.0, 0.0]]))
    assert out.tolist() == [1.0, 0.0] and agg.last_report.selected == [0]
