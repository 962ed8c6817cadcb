"""Each aggregator against a plainly written float64 version of its paper's formula, plus small
hand-checkable cases, structure in/out (state_dicts, parameter lists), reports, and errors."""
import math
from collections import OrderedDict

import numpy as np
import pytest
import torch
from conftest import DEVICE, RESOLUTION
from sklearn.cluster import MeanShift, estimate_bandwidth

from robustagg import NonFiniteUpdateError, reference
from robustagg import aggregators as A
from robustagg.aggregators.dnc import sample_columns
from robustagg.layout import Layout


def rand_G(n, d, seed=0, dtype=torch.float64, shift=0.5):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=g, dtype=torch.float64) + shift).to(dtype).to(DEVICE)


def close(actual, expected, dtype=torch.float64, scale=1.0):
    atol, rtol = RESOLUTION[dtype]
    torch.testing.assert_close(actual.detach().cpu().double(), expected.detach().cpu().double(),
                               atol=atol * scale, rtol=rtol * scale)


def X64(G):
    return G.detach().cpu().double()


# ---------------------------------------------------------------- float64 paper formulas

def fedavg_ref(G, w=None):
    w = torch.ones(G.shape[0], dtype=torch.float64) if w is None else torch.as_tensor(w, dtype=torch.float64)
    return (w[:, None] * G).sum(0) / w.sum()


def trimmed_ref(G, trim):
    return G.sort(0).values[trim:G.shape[0] - trim].mean(0)


def clipped(G, c):
    norm = G.norm(dim=1, keepdim=True)
    return torch.where(norm > c, G * c / norm, G)


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


def geomed_ref(G, w=None, nu=1e-6, max_iter=100, tol=1e-7):
    alpha = torch.ones(G.shape[0], dtype=torch.float64) if w is None else torch.as_tensor(w, dtype=torch.float64)
    z = (alpha[:, None] * G).sum(0) / alpha.sum()
    for it in range(1, max_iter + 1):
        beta = alpha / (G - z).norm(dim=1).clamp_min(nu)
        new = (beta[:, None] * G).sum(0) / beta.sum()
        done = (new - z).norm() <= tol * z.norm()
        z = new
        if done:
            return z, it
    return z, max_iter


def centered_clipping_ref(G, tau, iters, center):
    v = center.clone()
    for _ in range(iters):
        diff = G - v
        norm = diff.norm(dim=1, keepdim=True)
        v = v + (diff * torch.where(norm > tau, tau / norm, torch.ones_like(norm))).mean(0)
    return v


def invariant_ref(G, tau, lo, hi, strict=True):
    agreement = torch.sign(G).sum(0).abs() / G.shape[0]
    mask = agreement > tau if strict else agreement >= tau
    return torch.where(mask, G.sort(0).values[lo:hi].mean(0), torch.zeros(())), mask


def rlr_ref(G, theta, server_lr=1.0, base="mean", clip=None, w=None):
    X = G if clip is None else clipped(G, clip)
    votes = torch.sign(G).sum(0)
    lr = torch.where(votes.abs() >= theta, torch.tensor(server_lr, dtype=torch.float64), -server_lr)
    if base == "mean":
        b = fedavg_ref(X, w)
    elif base == "median":
        b = torch.from_numpy(np.median(X.numpy(), axis=0))
    else:
        b = torch.sign(votes) * median_norm_step_ref(X)
    return lr * b


def median_norm_step_ref(X):
    """The default sign step: the lower median of the row norms over sqrt(d)."""
    norms = sorted(X.norm(dim=1).tolist())
    return norms[(len(norms) - 1) // 2] / math.sqrt(X.shape[1])


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

@pytest.mark.parametrize("n,d", [(5, 7), (20, 129), (33, 64)])
def test_fedavg_matches_weighted_mean(n, d):
    G = rand_G(n, d)
    w = torch.rand(n, generator=torch.Generator().manual_seed(1)) + 0.1
    close(A.FedAvg()(G), fedavg_ref(X64(G)))
    close(A.FedAvg()(G, weights=w), fedavg_ref(X64(G), w))


@pytest.mark.parametrize("n,d", [(1, 5), (4, 33), (21, 100)])
def test_coordinate_median_matches_numpy(n, d):
    G = rand_G(n, d)
    close(A.CoordinateMedian()(G), torch.from_numpy(np.median(X64(G).numpy(), axis=0)))


@pytest.mark.parametrize("n,trim,alpha", [(10, 2, None), (33, None, 0.25), (5, 0, None)])
def test_trimmed_mean_matches_sort_and_slice(n, trim, alpha):
    G = rand_G(n, 50)
    agg = A.TrimmedMean(trim=trim, alpha=alpha)
    expected_trim = trim if trim is not None else math.ceil(alpha * n)
    close(agg(G), trimmed_ref(X64(G), expected_trim))
    assert agg.last_report.trim == expected_trim


def test_signsgd_is_majority_vote_times_lr():
    G = rand_G(9, 40, shift=0.0)
    close(A.SignSGD(server_lr=0.5)(G), 0.5 * torch.sign(torch.sign(X64(G)).sum(0)))


@pytest.mark.parametrize("n", [8, 9])
def test_signsgd_default_step_is_the_median_norm_over_sqrt_d(n):
    G = rand_G(n, 40, shift=0.0) * torch.arange(1, n + 1, dtype=torch.float64, device=DEVICE)[:, None]
    close(A.SignSGD()(G), median_norm_step_ref(X64(G)) * torch.sign(torch.sign(X64(G)).sum(0)))


def test_norm_clipping_matches_clipped_weighted_mean():
    G = rand_G(12, 60)
    w = torch.arange(1, 13, dtype=torch.float64)
    agg = A.NormClipping(max_norm=7.0)
    close(agg(G, weights=w), fedavg_ref(clipped(X64(G), 7.0), w))
    norms = X64(G).norm(dim=1)
    assert agg.last_report.clipped == [i for i in range(12) if norms[i] > 7.0]


def test_norm_clipping_noise_comes_from_the_generator():
    G = rand_G(6, 30)
    a = A.NormClipping(1.0, noise=0.5, seed=3)(G)
    b = A.NormClipping(1.0, noise=0.5, generator=torch.Generator().manual_seed(3))(G)
    c = A.NormClipping(1.0, noise=0.5, seed=4)(G)
    plain = A.NormClipping(1.0)(G)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert 0.3 < float((a - plain).std()) < 0.7


@pytest.mark.parametrize("n,d", [(5, 10), (20, 64)])
def test_geometric_median_matches_weiszfeld(n, d):
    G = rand_G(n, d)
    w = torch.rand(n, generator=torch.Generator().manual_seed(2)) + 0.5
    agg = A.GeometricMedian()
    expected, iterations = geomed_ref(X64(G), w)
    close(agg(G, weights=w), expected, scale=100)
    assert abs(agg.last_report.iterations - iterations) <= 1
    assert agg.last_report.converged


def test_geometric_median_of_collinear_points_is_the_middle_one():
    G = torch.tensor([[0.0, 0.0], [1.0, 0.0], [10.0, 0.0]], dtype=torch.float64, device=DEVICE)
    close(A.GeometricMedian(tol=1e-12, max_iter=1000)(G), torch.tensor([1.0, 0.0], dtype=torch.float64), scale=1e5)


def test_geometric_median_reports_iterations_capped_by_max_iter():
    agg = A.GeometricMedian(max_iter=3, tol=0.0)
    agg(rand_G(7, 9))
    assert agg.last_report.iterations == 3 and not agg.last_report.converged


def test_centered_clipping_two_rounds_keep_the_center():
    G1, G2 = rand_G(8, 20, seed=1), rand_G(8, 20, seed=2, shift=3.0)
    agg = A.CenteredClipping(tau=2.0, iters=3)
    out1 = agg(G1)
    ref1 = centered_clipping_ref(X64(G1), 2.0, 3, torch.zeros(20, dtype=torch.float64))
    close(out1, ref1, scale=10)
    out2 = agg(G2)
    close(out2, centered_clipping_ref(X64(G2), 2.0, 3, ref1), scale=10)


def test_centered_clipping_state_dict_round_trip():
    G1, G2 = rand_G(8, 20, seed=1), rand_G(8, 20, seed=2)
    a = A.CenteredClipping(tau=1.0, iters=2)
    a(G1)
    b = A.CenteredClipping(tau=1.0, iters=2)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a(G2), b(G2))


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


@pytest.mark.parametrize("d,b", [(10, 10), (10, 3), (1000, 50), (100000, 1000)])
def test_dnc_column_sample_is_distinct_sorted_and_in_range(d, b):
    cols = sample_columns(d, b, torch.Generator().manual_seed(0))
    assert cols.numel() == min(b, d) and bool((cols[1:] > cols[:-1]).all()) and 0 <= cols[0] and cols[-1] < d


def test_dnc_column_sample_is_uniform():
    counts = torch.zeros(40)
    gen = torch.Generator().manual_seed(0)
    for _ in range(2000):
        counts[sample_columns(40, 5, gen)] += 1
    # each column is picked with probability 5/40: 250 expected per column, sd ~ 15
    assert float(counts.min()) > 190 and float(counts.max()) < 310


def test_dnc_matches_svd_filtering():
    G = rand_G(12, 200, seed=5)
    G[3] += 4.0
    agg = A.DnC(f=2, niters=2, subsample_dim=50, c=1.0, seed=7)
    out = agg(G)
    gen = torch.Generator().manual_seed(7)
    X = X64(G)
    good = set(range(12))
    for _ in range(2):
        cols = sample_columns(200, 50, gen)
        S = X[:, cols]
        Sc = S - S.mean(0)
        v = torch.linalg.svd(Sc, full_matrices=False).Vh[0]
        s = (Sc @ v) ** 2
        good &= set(sorted(range(12), key=lambda i: (s[i].item(), i))[:10])
    close(out, X[sorted(good)].mean(0))
    assert agg.last_report.selected == sorted(good) and 3 not in good


@pytest.mark.parametrize("tau,alpha,strict", [(0.2, 0.25, True), (0.6, 0.1, False), (0.0, 0.25, True)])
def test_invariant_matches_mask_times_trimmed_mean(tau, alpha, strict):
    G = rand_G(20, 300, shift=0.2)
    agg = A.InvariantAggregator(tau, alpha=alpha, strict=strict)
    trim = math.ceil(alpha * 20)
    expected, mask = invariant_ref(X64(G), tau, trim, 20 - trim, strict)
    close(agg(G), expected)
    assert agg.last_report.mask_density == pytest.approx(mask.double().mean().item())


@pytest.mark.parametrize("n", [20, 33])
def test_invariant_official_keeps_the_authors_ranks(n):
    G = rand_G(n, 200, shift=0.3)
    agg = A.InvariantAggregator.official()
    lo, hi = int(0.45 * n), int(0.55 * n)
    expected, _ = invariant_ref(X64(G), 0.6, lo, hi, strict=False)
    close(agg(G), expected)
    assert (agg.last_report.lo, agg.last_report.hi) == (lo, hi)


def test_invariant_official_tau_is_inclusive():
    # 8 of 10 clients positive, 2 negative: agreement exactly 0.6 passes ">=" only
    G = torch.tensor([[1.0]] * 8 + [[-1.0]] * 2, dtype=torch.float64, device=DEVICE)
    assert A.InvariantAggregator.official()(G).item() == 1.0
    assert A.InvariantAggregator(0.6, trim=0)(G).item() == 0.0


@pytest.mark.parametrize("base", ["mean", "median", "sign"])
@pytest.mark.parametrize("clip", [None, 3.0])
def test_robust_lr_matches_the_formula(base, clip):
    G = rand_G(15, 80, shift=0.1)
    w = torch.arange(1, 16, dtype=torch.float64)
    agg = A.RobustLR(theta=5, server_lr=0.7, base=base, clip=clip)
    close(agg(G, weights=w), rlr_ref(X64(G), 5, 0.7, base, clip, w if base == "mean" else None))


def test_robust_lr_sign_step_one_is_the_authors_unit_sign():
    G = rand_G(15, 80, shift=0.1)
    votes = torch.sign(X64(G)).sum(0)
    expected = torch.where(votes.abs() >= 5, 1.0, -1.0).double() * torch.sign(votes)
    close(A.RobustLR(theta=5, base="sign", sign_step=1.0)(G), expected)


def test_robust_lr_noise_is_added_before_the_lr_sign():
    G = rand_G(15, 400, shift=0.0)
    agg = A.RobustLR(theta=8, base="mean", clip=2.0, noise=0.5, seed=1)
    out = agg(G)
    z = torch.randn(400, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * (0.5 * 2.0)
    votes = torch.sign(X64(G)).sum(0)
    lr = torch.where(votes.abs() >= 8, 1.0, -1.0)
    close(out, lr * (fedavg_ref(clipped(X64(G), 2.0)) + z))
    assert agg.last_report.lr_positive_fraction == pytest.approx((votes.abs() >= 8).double().mean().item())


def sparsefed_ref(rounds, k, rho, lr, clip):
    d = rounds[0].shape[1]
    e, m = torch.zeros(d, dtype=torch.float64), torch.zeros(d, dtype=torch.float64)
    outs = []
    for G in rounds:
        u = clipped(G, clip).mean(0)
        m = rho * m + u
        e = e + m
        order = sorted(range(d), key=lambda j: (-abs(e[j].item()), j))[:k]
        delta = torch.zeros(d, dtype=torch.float64)
        delta[order] = e[order] * lr
        e[order] = 0
        m[order] = 0
        outs.append(delta)
    return outs


def test_sparsefed_three_rounds_match_error_feedback():
    rounds = [rand_G(6, 50, seed=s) for s in range(3)]
    agg = A.SparseFed(k=7, rho=0.9, lr=0.5, clip=4.0)
    for G, expected in zip(rounds, sparsefed_ref([X64(G) for G in rounds], 7, 0.9, 0.5, 4.0)):
        out = agg(G)
        close(out, expected)
        assert int((out != 0).sum()) == 7


def test_sparsefed_default_adds_exactly_the_sum_of_the_mean_deltas():
    # rho = 0: what the rounds returned plus what the error still holds is the sum of the means,
    # so a server that adds the outputs to the model falls behind FedAvg by the residual only
    rounds = [rand_G(6, 50, seed=s) for s in range(4)]
    agg = A.SparseFed(k=7)
    returned = sum(agg(G) for G in rounds)
    close(returned + agg.error, sum(X64(G).mean(0) for G in rounds))
    assert agg.rho == 0.0 and agg.lr == 1.0


def test_sparsefed_paper_preset_has_the_paper_momentum():
    agg = A.SparseFed.paper(7, clip=4.0)
    assert (agg.k, agg.rho, agg.lr, agg.clip) == (7, 0.9, 1.0, 4.0)


def test_sparsefed_state_dict_resumes_identically():
    G1, G2 = rand_G(6, 50, seed=1), rand_G(6, 50, seed=2)
    a = A.SparseFed(k=5, clip=3.0)
    a(G1)
    b = A.SparseFed(k=5, clip=3.0)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a(G2), b(G2))
    fresh = A.SparseFed(k=5, clip=3.0)
    assert not torch.equal(fresh(G2), b(G2))


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

def T(rows):
    return torch.tensor(rows, dtype=torch.float64, device=DEVICE)


def test_hand_fedavg_weighted():
    assert A.FedAvg()(T([[1.0, 2.0], [3.0, 4.0]]), weights=[1.0, 3.0]).tolist() == [2.5, 3.5]


def test_hand_median_even_n_averages_the_middle_two():
    assert A.CoordinateMedian()(T([[1.0], [5.0], [2.0], [10.0]])).tolist() == [3.5]


def test_hand_trimmed_mean_drops_the_outlier():
    assert A.TrimmedMean(trim=1)(T([[1.0], [2.0], [3.0], [100.0]])).tolist() == [2.5]


def test_hand_krum():
    # scores with n-f-2 = 2 neighbours: row0 1+4, row1 1+1, row2 1+4, rows 3/4 huge
    agg = A.Krum(1)
    assert agg(T([[0.0], [1.0], [2.0], [100.0], [101.0]])).tolist() == [1.0]
    assert agg.last_report.scores[1] == 2.0


def test_hand_signsgd():
    assert A.SignSGD(server_lr=1.0)(T([[1.0, -1.0], [2.0, -3.0], [-1.0, 0.0]])).tolist() == [1.0, -1.0]
    # norms 2, 4, 600, 5 (lower median 4) over sqrt(d) = 2: steps of 2; the huge client only votes
    G = T([[1.0, 1.0, 1.0, 1.0], [2.0, 2.0, 2.0, -2.0], [300.0, 300.0, 300.0, -300.0], [0.0, 3.0, 4.0, 0.0]])
    assert A.SignSGD()(G).tolist() == [2.0, 2.0, 2.0, -2.0]


def test_hand_fltrust():
    agg = A.FLTrust(torch.tensor([1.0, 0.0], dtype=torch.float64))
    out = agg(T([[2.0, 0.0], [0.0, 3.0], [-1.0, 0.0]]))
    assert out.tolist() == [1.0, 0.0] and agg.last_report.selected == [0]


def test_hand_robust_lr_flips_the_contested_coordinate():
    # votes: coordinate 0 has 3 agreeing signs, coordinate 1 only |1 - 2| = 1 < theta = 2
    out = A.RobustLR(theta=2)(T([[1.0, 3.0], [2.0, -1.0], [3.0, -2.0]]))
    assert out.tolist() == [2.0, 0.0]
    out = A.RobustLR(theta=2)(T([[1.0, 3.0], [2.0, -1.0], [3.0, -5.0]]))
    assert out.tolist() == [2.0, 1.0]


# ---------------------------------------------------------------- structures in and out

def state_dicts(n=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        out.append(OrderedDict([
            ("conv.weight", torch.randn(4, 2, 3, 3, generator=g)),
            ("conv.bias", torch.randn(4, generator=g)),
            ("bn.running_mean", torch.randn(4, generator=g)),
            ("bn.num_batches_tracked", torch.tensor(10 + i, dtype=torch.int64)),
            ("fc.weight", torch.randn(3, 8, generator=g, dtype=torch.float64)),
        ]))
    return out


def all_aggregators(root):
    return [A.FedAvg(), A.CoordinateMedian(), A.TrimmedMean(trim=1), A.SignSGD(), A.NormClipping(3.0),
            A.GeometricMedian(), A.CenteredClipping(3.0), A.Krum(1), A.MultiKrum(1, 3), A.MultiKrumCos(1),
            A.Bulyan(1), A.DnC(1, subsample_dim=20), A.InvariantAggregator(0.2), A.InvariantAggregator.official(),
            A.RobustLR(2), A.RobustLR(2, base="median", clip=5.0, noise=0.1), A.RobustLR(2, base="sign"),
            A.SparseFed(10, clip=5.0), A.SignGuard(), A.SignGuard(variant="sim"), A.SignGuard(variant="dist"),
            A.CosDen(3, 0.2), A.EuDen(3, 0.2, score="official"), A.MgDen(3, 0.2), A.FLTrust(root), A.FLTrustAmp(root)]


@pytest.mark.parametrize("index", range(26))
def test_state_dicts_come_back_with_the_same_keys_shapes_and_dtypes(index):
    sds = state_dicts(10)
    agg = all_aggregators(sds[0])[index]
    out = agg(sds)
    assert list(out) == list(sds[0])
    for key, value in sds[0].items():
        assert out[key].shape == value.shape and out[key].dtype == value.dtype, key
        assert bool(torch.isfinite(out[key].double()).all()), key


def test_state_dict_int64_buffer_is_the_exact_median():
    out = A.FedAvg()(state_dicts(4))
    assert out["bn.num_batches_tracked"].dtype == torch.int64
    assert out["bn.num_batches_tracked"].item() == 11   # lower median of 10..13, never through a float


def test_parameter_lists_and_vectors_come_back_as_given():
    g = torch.Generator().manual_seed(0)
    params = [[torch.randn(3, 4, generator=g), torch.randn(4, generator=g)] for _ in range(5)]
    out = A.CoordinateMedian()(params)
    assert isinstance(out, list) and [p.shape for p in out] == [(3, 4), (4,)]
    stacked = np.stack([torch.cat([p.reshape(-1) for p in ps]).numpy() for ps in params])
    expected = torch.from_numpy(np.median(stacked, 0))
    close(torch.cat([p.reshape(-1) for p in out]).double(), expected, torch.float32)
    vectors = [torch.randn(6, generator=g) for _ in range(5)]
    out = A.FedAvg()(vectors)
    assert out.shape == (6,)
    close(out, torch.stack(vectors).double().mean(0), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_lower_precision_inputs_match_the_float64_formula(dtype):
    G = rand_G(20, 100, dtype=dtype)
    X = X64(G)
    close(A.TrimmedMean(trim=3)(G), trimmed_ref(X, 3), dtype)
    close(A.FedAvg()(G), fedavg_ref(X), dtype)
    close(A.NormClipping(5.0)(G), fedavg_ref(clipped(X, 5.0)), dtype, scale=4)
    assert A.FedAvg()(G).dtype == dtype


# ---------------------------------------------------------------- non-finite clients

@pytest.mark.parametrize("index", range(26))
def test_nonfinite_client_is_dropped_and_reported(index):
    G = rand_G(14, 60, seed=3)
    G[4, 7] = float("nan")
    G[11] = float("inf")
    agg = all_aggregators(G[0].clone())[index]
    if isinstance(agg, (A.CosDen, A.EuDen, A.MgDen, A.FLTrustAmp)):
        agg.layout = Layout.flat(6)
    out = agg(G)
    assert bool(torch.isfinite(out).all())
    assert agg.last_report.rejected_nonfinite == [4, 11]
    if agg.last_report.selected is not None:
        assert not {4, 11} & set(agg.last_report.selected)


def test_nonfinite_drop_gives_the_same_result_as_removing_the_rows():
    G = rand_G(12, 40, seed=2)
    G[3, 0] = float("-inf")
    keep = [i for i in range(12) if i != 3]
    for make in (lambda: A.Krum(2), lambda: A.TrimmedMean(trim=2), lambda: A.GeometricMedian(),
                 lambda: A.SignGuard(seed=1), lambda: A.RobustLR(3, clip=4.0)):
        agg = make()
        out = agg(G)
        clean = make()
        expected = clean(G[keep])
        close(out, expected)
        if clean.last_report.selected is not None:
            assert agg.last_report.selected == [keep[i] for i in clean.last_report.selected]


def test_nonfinite_raise_names_the_clients():
    G = rand_G(8, 10)
    G[5, 2] = float("nan")
    with pytest.raises(NonFiniteUpdateError) as err:
        A.TrimmedMean(trim=1, nonfinite="raise")(G)
    assert err.value.clients == [5]
    with pytest.raises(NonFiniteUpdateError) as err:
        A.Krum(1, nonfinite="raise")(G)
    assert err.value.clients == [5]


def test_all_clients_nonfinite_is_a_clear_error():
    with pytest.raises(ValueError, match="no finite row"):
        A.FedAvg()(torch.full((3, 4), float("nan"), device=DEVICE))


# ---------------------------------------------------------------- parameters that do not fit n

@pytest.mark.parametrize("make,n,match", [
    (lambda: A.Krum(3), 8, r"f=3 .*n >= 2f\+3"),
    (lambda: A.MultiKrum(1, m=9), 8, r"m=9 exceeds n=8"),
    (lambda: A.Bulyan(2), 10, r"f=2 .*n >= 4f\+3"),
    (lambda: A.TrimmedMean(trim=4), 8, r"trim=4 leaves nothing for n=8"),
    (lambda: A.TrimmedMean(alpha=0.5), 8, r"alpha=0.5 .*leaves nothing"),
    (lambda: A.InvariantAggregator(0.2, trim=3), 6, r"trim=3 leaves nothing"),
    (lambda: A.InvariantAggregator.official(), 5, r"empty for n=5"),
    (lambda: A.CosDen(k_nearest=9, malicious_frac=0.2), 8, r"k_nearest=9 exceeds n=8"),
    (lambda: A.EuDen(k_nearest=2, malicious_frac=1.0), 8, r"malicious_frac=1.0 keeps"),
    (lambda: A.RobustLR(theta=9), 8, r"theta=9 .*exceeds n=8"),
    (lambda: A.DnC(f=4, c=2.0), 8, r"removes 8 of n=8"),
])
def test_parameters_that_do_not_fit_n_are_clear_errors(make, n, match):
    with pytest.raises(ValueError, match=match):
        make()(rand_G(n, 12))


def test_nonfinite_drop_rechecks_parameters_on_the_survivors():
    G = rand_G(7, 5)
    G[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"f=2 is too large for n=6"):
        A.Krum(2)(G)


@pytest.mark.parametrize("make,match", [
    (lambda: A.TrimmedMean(), r"exactly one of trim"),
    (lambda: A.RobustLR(2, noise=1.0), r"noise=1.0 needs clip"),
    (lambda: A.NormClipping(0.0), r"max_norm=0.0 is out of range"),
    (lambda: A.SignGuard(variant="cos"), r"variant='cos'"),
    (lambda: A.Krum(-1), r"f=-1 is out of range"),
    (lambda: A.FedAvg(nonfinite="ignore"), r"nonfinite='ignore'"),
])
def test_bad_constructor_arguments_are_clear_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_weights_of_the_wrong_length_are_an_error():
    with pytest.raises(ValueError, match=r"weights has shape \(3,\); it must be \(4,\)"):
        A.FedAvg()(rand_G(4, 3), weights=[1.0, 2.0, 3.0])


def test_backend_torch_gives_the_same_aggregate():
    G = rand_G(14, 60, seed=3)
    for a, b in zip(all_aggregators(G[0].clone()), all_aggregators(G[0].clone())):
        if isinstance(a, (A.CosDen, A.EuDen, A.MgDen, A.FLTrustAmp)):
            a.layout = b.layout = Layout.flat(6)
        b.backend = "torch"
        close(a(G), b(G), scale=10)


# ---------------------------------------------------------------- the benchmark's configurations

def test_bench_make_aggregators_covers_every_rule_and_returns_d_vectors():
    from robustagg.bench.aggregators import make_aggregators

    layout = Layout.from_shapes([(10, 12), (12,), (4, 2, 3, 3), (16,)])
    G = rand_G(20, layout.d, dtype=torch.float32)
    aggs = make_aggregators(20, layout, G[:2].mean(0), backend=None)
    classes = {type(a) for a in aggs.values()}
    rules = {getattr(A, name) for name in A.__all__ if not name.endswith("Report") and name != "Aggregator"}
    assert rules <= classes
    for name, agg in aggs.items():
        out = agg(G)
        assert out.shape == (layout.d,) and bool(torch.isfinite(out).all()), name
