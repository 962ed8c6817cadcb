"""MDA, MoNNA (robustagg/aggregators/subsets.py) and Meamed (classic.py) against plainly written
float64 versions of the papers' rules: brute-force subsets for MDA, sorted distances for MoNNA and
Meamed, plus ties, non-finite rows, huge finite rows and the argument errors."""
import itertools
import math

import numpy as np
import pytest
import torch
from aggregator_formulas import T, X64, close, rand_G
from conftest import DEVICE

import robustagg
from robustagg import aggregators as A
from robustagg.aggregators.subsets import minimum_diameter_subset


# ---------------------------------------------------------------- float64 paper formulas

def mda_ref(G, f):
    """Every (n - f)-subset in itertools order; a strictly smaller diameter replaces the best, so
    the lexicographically smallest of the optimal subsets wins."""
    n = G.shape[0]
    best, best_diameter = None, float("inf")
    for S in itertools.combinations(range(n), n - f):
        diameter = max((float((G[i] - G[j]).norm()) for i, j in itertools.combinations(S, 2)), default=0.0)
        if diameter < best_diameter:
            best, best_diameter = list(S), diameter
    return G[best].mean(0), best, best_diameter


def monna_ref(G, f, idx):
    n = G.shape[0]
    dist = [float((G[i] - G[idx]).norm()) for i in range(n)]
    order = sorted(range(n), key=lambda i: (i != idx, dist[i], i))[:n - f]
    return G[sorted(order)].mean(0), sorted(order)


def meamed_ref(G, f):
    n = G.shape[0]
    med = np.median(G.numpy(), axis=0)
    out = torch.empty(G.shape[1], dtype=torch.float64)
    for k in range(G.shape[1]):
        order = sorted(range(n), key=lambda i: (abs(G[i, k].item() - med[k]), i))[:n - f]
        out[k] = G[order, k].mean()
    return out


# ---------------------------------------------------------------- MDA

@pytest.mark.parametrize("n,f", [(3, 1), (5, 1), (7, 2), (9, 4), (12, 3)])
def test_mda_matches_brute_force(n, f):
    G = rand_G(n, 6, seed=n + f)
    agg = A.MDA(f)
    expected, chosen, diameter = mda_ref(X64(G), f)
    close(agg(G), expected)
    assert agg.last_report.selected == chosen
    assert abs(agg.last_report.diameter - diameter) <= 1e-9 * diameter


def test_mda_hand_cases():
    # 1-D points 0, 0.1, 10, 11, 12, f=2: {10, 11, 12} has diameter 2, every other triple >= 10.
    G = T([[0.0], [0.1], [10.0], [11.0], [12.0]])
    agg = A.MDA(2)
    assert agg(G).tolist() == [11.0] and agg.last_report.selected == [2, 3, 4]
    assert agg.last_report.diameter == 2.0
    # 0, 1, 2, 3 with f=1: {0,1,2} and {1,2,3} both have diameter 2; the lexicographically smaller
    # index set wins, whichever values it holds.
    for values, mean in [([0.0, 1.0, 2.0, 3.0], 1.0), ([3.0, 2.0, 1.0, 0.0], 2.0)]:
        assert A.MDA(1)(T([[v] for v in values])).tolist() == [mean]


@pytest.mark.parametrize("n,f", [(5, 1), (9, 3)])
def test_mda_ties_on_integer_points(n, f):
    g = torch.Generator().manual_seed(3)
    G = torch.randint(-1, 2, (n, 4), generator=g).double().to(DEVICE)
    G[1] = G[0]
    agg = A.MDA(f)
    expected, chosen, _ = mda_ref(X64(G), f)
    close(agg(G), expected)
    assert agg.last_report.selected == chosen


def test_mda_leaves_out_far_rows():
    G = rand_G(9, 8, seed=5)
    G[[2, 6]] = 1e30
    agg = A.MDA(2)
    expected, chosen, _ = mda_ref(X64(G), 2)
    close(agg(G), expected)
    assert 2 not in agg.last_report.selected and 6 not in agg.last_report.selected


def test_mda_refuses_a_search_too_large():
    with pytest.raises(ValueError, match=r"n=47 clients with f=23 give C\(47, 24\) = \d+ subsets.*max_branches=65536"):
        A.MDA(23)(rand_G(47, 2))
    # f=3 at n=10: at most F(5) = 5 leaves, fewer than the 176 removal sets of <= 3 clients
    with pytest.raises(ValueError, match="may branch 5 times, over max_branches=4"):
        A.MDA(3, max_branches=4)(rand_G(10, 2))
    close(A.MDA(3, max_branches=5)(rand_G(10, 2)), mda_ref(X64(rand_G(10, 2)), 3)[0])
    with pytest.raises(ValueError, match=r"f=2 is too large for n=4 clients; MDA needs n >= 2f\+1"):
        A.MDA(2)(rand_G(4, 2))


# ---------------------------------------------------------------- MoNNA

@pytest.mark.parametrize("n,f,idx", [(3, 1, 0), (7, 3, 4), (12, 2, 11), (20, 9, 5)])
def test_monna_matches_sorted_distances(n, f, idx):
    G = rand_G(n, 10, seed=n)
    agg = A.MoNNA(f, idx=idx)
    expected, chosen = monna_ref(X64(G), f, idx)
    close(agg(G), expected)
    assert agg.last_report.selected == chosen and idx in chosen


def test_monna_ties_go_to_the_trusted_client_then_the_lower_index():
    # Rows 0 and 2 copy the trusted row 1; f=2 keeps 3 of 5 (the trusted one first); rows 3 and 4
    # are both at distance 1 and row 3 wins.
    G = T([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    agg = A.MoNNA(2, idx=1)
    agg(G)
    assert agg.last_report.selected == [0, 1, 2]
    agg = A.MoNNA(1, idx=1)
    assert agg(G).tolist() == [0.25, 0.0] and agg.last_report.selected == [0, 1, 2, 3]


def test_monna_trusted_non_finite_client():
    G = rand_G(7, 5)
    G[3, 2] = float("nan")
    with pytest.raises(ValueError, match="trusted client idx=3 sent NaN or Inf"):
        A.MoNNA(1, idx=3)(G)
    with pytest.raises(robustagg.NonFiniteUpdateError):
        A.MoNNA(1, idx=3, nonfinite="raise")(G)
    with pytest.raises(ValueError, match=r"idx=7 is not a client of n=7"):
        A.MoNNA(1, idx=7)(G)


# ---------------------------------------------------------------- Meamed

@pytest.mark.parametrize("n,f", [(1, 0), (4, 1), (7, 3), (20, 5), (21, 10)])
def test_meamed_matches_the_formula(n, f):
    G = rand_G(n, 33, seed=n)
    agg = A.Meamed(f)
    close(agg(G), meamed_ref(X64(G), f))
    assert agg.last_report.kept == n - f


def test_meamed_hand_cases():
    # n=7, f=3: median 0, distances 2, 2, 0, 1, 1, 5, 5; keep 0, 1, -1 and the lower-index tie.
    assert A.Meamed(3)(T([[2.0], [-2.0], [0.0], [1.0], [-1.0], [5.0], [-5.0]])).tolist() == [0.5]
    assert A.Meamed(3)(T([[-2.0], [2.0], [0.0], [1.0], [-1.0], [5.0], [-5.0]])).tolist() == [-0.5]
    # even n=4, f=1: the numpy median of 0, 1, 2, 2.4 is 1.5, so 1, 2, 2.4 are kept (mean 1.8); the
    # lower middle 1 would keep 1, 0, 2 (mean 1).
    close(A.Meamed(1)(T([[0.0], [1.0], [2.0], [2.4]])), torch.tensor([1.8], dtype=torch.float64))


def test_meamed_checks_f_on_the_finite_clients():
    G = rand_G(5, 4)
    G[0, 0] = float("inf")
    agg = A.Meamed(1)
    close(agg(G), meamed_ref(X64(G)[1:], 1))
    assert agg.last_report.rejected_nonfinite == [0]
    with pytest.raises(ValueError, match=r"f=2 is too large for n=4 clients"):
        A.Meamed(2)(G)


# ---------------------------------------------------------------- shared: NaN rows, huge rows, arguments

RULES = {"MDA": (lambda: A.MDA(2), lambda G: mda_ref(G, 2)[0]),
         "MoNNA": (lambda: A.MoNNA(2, idx=0), lambda G: monna_ref(G, 2, 0)[0]),
         "Meamed": (lambda: A.Meamed(2), lambda G: meamed_ref(G, 2))}


@pytest.mark.parametrize("name", list(RULES))
def test_nan_row_is_dropped(name):
    make, ref = RULES[name]
    G = rand_G(8, 6, seed=2)
    G[4] = float("nan")
    agg = make()
    keep = [0, 1, 2, 3, 5, 6, 7]
    close(agg(G), ref(X64(G)[keep]))
    assert agg.last_report.rejected_nonfinite == [4]
    assert agg.last_report.selected is not None and 4 not in agg.last_report.selected


@pytest.mark.parametrize("dtype,huge", [(torch.float32, 3e38), (torch.float64, 1e300)])
@pytest.mark.parametrize("name", list(RULES))
def test_huge_finite_rows_do_not_steer(name, dtype, huge):
    make, ref = RULES[name]
    G = rand_G(8, 6, seed=4)
    G[[3, 6]] = huge
    G = G.to(dtype)
    out = make()(G)
    assert torch.isfinite(out).all()
    # the two huge clients are the f=2 left out: the result is the honest rows' rule
    honest = X64(G)[[0, 1, 2, 4, 5, 7]]
    expected = {"MDA": honest.mean(0), "MoNNA": honest.mean(0), "Meamed": ref(X64(G))}[name]
    close(out, expected, dtype=dtype)


@pytest.mark.parametrize("dtype,huge", [(torch.float32, 3e38), (torch.float64, 1e300)])
def test_a_kept_huge_row_gives_a_finite_mean(dtype, huge):
    G = rand_G(5, 4, seed=6)
    G[2] = huge
    G = G.to(dtype)
    for agg in (A.MDA(0), A.MoNNA(0), A.Meamed(0)):
        out = agg(G)
        assert torch.isfinite(out).all(), agg
        close(out, X64(G).mean(0), dtype=dtype)


def test_bad_arguments():
    with pytest.raises(ValueError, match="f"):
        A.MDA(-1)
    with pytest.raises(TypeError, match="f must be an int"):
        A.Meamed(1.5)
    with pytest.raises(ValueError, match="idx"):
        A.MoNNA(1, idx=-1)
    with pytest.raises(ValueError, match="max_branches"):
        A.MDA(1, max_branches=0)


def test_mda_search_is_unchanged_by_last_bit_asymmetry():
    # An all-reduce over ranks can leave D[i, j] and D[j, i] one ulp apart; the search must still
    # return n - f clients, the same as on the exactly symmetric matrix.
    X = torch.randn(12, 7, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    X[10] = X[11] = X[9]
    D = torch.cdist(X, X) ** 2
    D = (D + D.T) / 2
    skewed = D.clone()
    lower = torch.tril(torch.ones(12, 12, dtype=torch.bool), diagonal=-1)   # the search reads the upper
    skewed[lower] = torch.nextafter(D[lower], torch.tensor(math.inf, dtype=torch.float64))
    expected = minimum_diameter_subset(D, 2)
    assert len(expected[0]) == 10
    assert minimum_diameter_subset(skewed, 2)[0] == expected[0]
