"""CAF and SMEA (robustagg/aggregators/spectral.py) against their rules written out plainly: in
float64 with the d x d covariance (d is small here) and loops over iterations and subsets, and in
exact rational arithmetic (fractions) in one dimension; on random, far, huge, tied and NaN rows."""
import itertools
from fractions import Fraction

import pytest
import torch
from aggregator_formulas import T, X64, close, rand_G

from robustagg.aggregators.spectral import CAF, SMEA

# ---------------------------------------------------------------- the paper formulas, plainly

def F64(values):
    """Python floats as a float64 CPU tensor (torch.tensor alone gives float32)."""
    return torch.tensor(values, dtype=torch.float64)


TIE = 1e-9   # eigenvalues within this relative distance count as tied: the earlier wins (ours: 2^-30)


def covariance_top(X, c):
    """Top eigenpair of sum_i c_i (x_i - mu)(x_i - mu)^T / sum c, with mu the c-weighted mean: the
    d x d matrix, torch.linalg.eigh."""
    mu = (c[:, None] * X).sum(0) / c.sum()
    Z = X - mu
    values, vectors = torch.linalg.eigh((c[:, None] * Z).T @ Z / c.sum())
    return mu, values[-1], vectors[:, -1]


def caf_trace(X, f):
    """Allouah, Guerraoui & Stephan (ICML 2025), Alg. 2: (output, eigenvalue per iteration, index
    of the iteration returned, weights at that iteration). Clients whose tau is within a relative
    1e-12 of tau_max count as tied with it and are zeroed with it, as exact arithmetic would zero
    duplicated rows (rounding can put their taus an ulp apart); no other tau comes that close here."""
    n = X.shape[0]
    c = torch.ones(n, dtype=torch.float64)
    best, best_lam, best_it, best_c, lams = X.mean(0), float("inf"), None, c, []
    while float(c.sum()) > n - 2 * f:
        mu, lam, v = covariance_top(X, c)
        lams.append(float(lam))
        if float(lam) < best_lam * (1 - TIE):
            best, best_lam, best_it, best_c = mu, float(lam), len(lams) - 1, c.clone()
        if float(lam) <= 0:   # the weighted rows coincide: nothing can do better
            break
        tau = ((X - mu) @ v) ** 2
        tau_max = tau[c > 0].max()   # over the clients still weighted
        c = torch.where(c > 0, c * (1 - tau / tau_max), c).clamp_min(0)
        c[tau >= tau_max * (1 - 1e-12)] = 0.0
    return best, lams, best_it, best_c


def caf_ref(X, f):
    return caf_trace(X, f)[0]


def smea_ref(X, f):
    """Allouah et al. (ICML 2023): the mean of the first subset of n - f rows, in
    itertools.combinations order, whose covariance has the smallest top eigenvalue."""
    n = X.shape[0]
    best, best_lam = None, float("inf")
    for S in itertools.combinations(range(n), n - f):
        _, lam, _ = covariance_top(X[list(S)], torch.ones(n - f, dtype=torch.float64))
        if float(lam) < best_lam * (1 - TIE):
            best, best_lam = X[list(S)].mean(0), float(lam)
    return best


def caf_exact_1d(x, f):
    """CAF on 1-D points in exact rational arithmetic: the covariance is the variance, v = 1,
    exact ties are ties. Returns (output, the iteration returned, whether some update had two or
    more weighted clients tied for tau_max)."""
    x = [Fraction(v) for v in x]
    n = len(x)
    c = [Fraction(1)] * n
    best, best_lam, best_it, it, tied = None, None, None, 0, False
    while sum(c) > n - 2 * f:
        mu = sum(ci * xi for ci, xi in zip(c, x)) / sum(c)
        lam = sum(ci * (xi - mu) ** 2 for ci, xi in zip(c, x)) / sum(c)
        if best_lam is None or lam < best_lam:
            best, best_lam, best_it = mu, lam, it
        if lam == 0:
            break
        tau = [(xi - mu) ** 2 for xi in x]
        tau_max = max(t for t, ci in zip(tau, c) if ci > 0)
        tied = tied or sum(1 for t, ci in zip(tau, c) if ci > 0 and t == tau_max) > 1
        c = [ci * (1 - t / tau_max) if ci > 0 else ci for ci, t in zip(c, tau)]
        it += 1
    return (sum(x) / n if best is None else best), best_it, tied


def smea_exact_1d(x, f):
    """SMEA on 1-D points in exact rational arithmetic: (output, the subset chosen)."""
    x = [Fraction(v) for v in x]
    best, best_var, best_S = None, None, None
    for S in itertools.combinations(range(len(x)), len(x) - f):
        mean = sum(x[i] for i in S) / len(S)
        var = sum((x[i] - mean) ** 2 for i in S) / len(S)
        if best_var is None or var < best_var:
            best, best_var, best_S = mean, var, list(S)
    return best, best_S


# ---------------------------------------------------------------- random, far and huge rows

@pytest.mark.parametrize("n,d,f", [(5, 3, 1), (7, 16, 2), (9, 8, 4), (12, 20, 3)])
@pytest.mark.parametrize("far", [None, 30.0, 1e6, 1e30])
def test_caf_and_smea_match_the_float64_formulas(n, d, f, far):
    G = rand_G(n, d, seed=n + d)
    if far is not None:
        G[n // 2] = far
    expected, lams, best_it, best_c = caf_trace(X64(G), f)
    agg = CAF(f)
    close(agg(G), expected)
    report = agg.last_report
    # the same iterations, each with the same eigenvalue, and the same one returned
    close(F64(report.eigenvalues), F64(lams))
    assert report.best_iteration == best_it
    assert report.selected == (best_c > 0).nonzero().flatten().tolist()
    if far is not None and f > 0:
        assert n // 2 not in report.selected
    if n <= 9:
        agg = SMEA(f)
        close(agg(G), smea_ref(X64(G), f))
        if far is not None:
            assert n // 2 not in agg.last_report.selected


@pytest.mark.parametrize("n,d,f", [(7, 5, 2), (9, 8, 3)])
def test_caf_and_smea_with_a_1e300_row_in_float64(n, d, f):
    # A row at 1e300 overflows the float64 formulas (its squared distances), so the expected values
    # come from the same rows with that row at 1e30, where the formulas are finite:
    # - SMEA: every subset holding the far row has an eigenvalue >= (1e30)^2 / n, so the winner is
    #   the best subset of the n - 1 others: smea_ref on them with f - 1 (the order is kept).
    # - CAF: the far row is zeroed at the first update; the others' first weights are
    #   1 - tau_i / tau_far = 1 - (1/(n-1))^2 (1 + O(|x| / far)), the same to rounding for any far
    #   >= 1e30; later iterations do not see the far row; so the output is the same for both.
    G = rand_G(n, d, seed=7)
    G[2] = 1e300
    keep = [i for i in range(n) if i != 2]
    agg = SMEA(f)
    close(agg(G), smea_ref(X64(G)[keep], f - 1))
    assert 2 not in agg.last_report.selected
    agg = CAF(f)
    out = agg(G)
    assert 2 not in agg.last_report.selected
    G[2] = 1e30
    close(out, caf_ref(X64(G), f))


@pytest.mark.parametrize("rule", [CAF, SMEA])
@pytest.mark.parametrize("dtype,huge", [(torch.float32, 3e38), (torch.float64, 1e300)])
def test_a_huge_row_gives_the_output_without_it(rule, dtype, huge):
    # One row at `huge` is filtered out; the output equals the rule on the same input with that row
    # at 1e12 instead (SMEA: the same subset; CAF: the honest weights differ by O(1/far^2)).
    G = rand_G(7, 5, seed=3, dtype=dtype)
    G[3] = huge
    out = rule(2)(G)
    assert bool(torch.isfinite(out).all())
    G[3] = 1e12
    close(out, rule(2)(G), dtype=dtype, scale=1e3)


# ---------------------------------------------------------------- exact values: ties, f = 0

# Small integers with repeated values, where no update has two weighted clients tied for tau_max
# (caf_exact_1d asserts it; see test_caf_ties_for_tau_max for those) and CAF returns a late iteration.
INTEGER_1D = [
    ([0, 0, 3], 1),
    ([0, 1, 1, 2, 7], 1),
    ([1, 2, 3, 4, 5, 6, 7, 8, 100], 3),
    ([5, 10, -6, 5, 1, -5, 5, -3, 5, 9], 3),
    ([0, 0, 0, 6, 0, -6, 5, 7, -1, -2], 4),
    ([-5, -5, -5, 4, 0, -2, 12, -2, 7], 2),
]
# Inputs where an update has several weighted clients tied for tau_max (duplicated rows, or rows
# symmetric about the mean): the rule zeroes them all at once.
TIED_1D = [
    ([10, 0, -4, -1, 10], 2),                    # tau = 49, 9, 49, 16, 49 at mean 3
    ([6, 6, -3, 20, 20, -2], 2),                 # the two 20s
    ([-4, -4, 0, 1, 1, 1, 6, 12, 12, 20], 4),    # the two 12s at the second update
]


@pytest.mark.parametrize("x,f", INTEGER_1D)
def test_caf_in_one_dimension_against_exact_arithmetic(x, f):
    expected, best_it, tied = caf_exact_1d(x, f)
    assert not tied and best_it >= 1
    agg = CAF(f)
    close(agg(T([[v] for v in x])), T([float(expected)]))
    assert agg.last_report.best_iteration == best_it


def test_caf_tied_cases_are_ties():
    # The premise of test_caf_ties_for_tau_max, by hand for the first: 10, 0, -4, -1, 10 (f = 2)
    # has mean 3 and tau = 49, 9, 49, 16, 49: three clients tied, zeroed at once, weights
    # 0, 40/49, 0, 33/49, 0 (sum 73/49 > n - 2f = 1), then the mean -33/73, variance below 34.4.
    assert caf_exact_1d(*TIED_1D[0]) == (Fraction(-33, 73), 1, True)
    assert caf_exact_1d(*TIED_1D[1]) == (Fraction(2312, 557), 1, True)
    assert caf_exact_1d(*TIED_1D[2]) == (Fraction(1), 5, True)


@pytest.mark.parametrize("x,f", TIED_1D)
def test_caf_ties_for_tau_max(x, f):
    # Rounding leaves exactly tied scores an ulp apart; every one of them must reach weight 0 at once.
    expected, best_it, _ = caf_exact_1d(x, f)
    agg = CAF(f)
    close(agg(T([[v] for v in x])), T([float(expected)]))
    assert agg.last_report.best_iteration == best_it


@pytest.mark.parametrize("x,f", INTEGER_1D + TIED_1D)
def test_smea_in_one_dimension_against_exact_arithmetic(x, f):
    expected, subset = smea_exact_1d(x, f)
    agg = SMEA(f)
    close(agg(T([[v] for v in x])), T([float(expected)]))
    assert agg.last_report.selected == subset


def test_caf_hand_case_with_duplicates():
    # 0, 0, 3 (f = 1): mean 1, variance 2, tau = 1, 1, 4: weights 3/4, 3/4, 0 (sum 1.5 > n - 2f = 1);
    # then mean 0 and variance 0: the loop stops there and returns 0.
    agg = CAF(1)
    assert agg(T([[0.0], [0.0], [3.0]])).tolist() == [0.0]
    report = agg.last_report
    close(F64(report.eigenvalues), F64([2.0, 0.0]))
    assert report.best_iteration == 1
    assert report.weights == {0: 0.75, 1: 0.75}
    # The same on a line in 3-D: (1, 2, -1) + t (2, 0, 1) for t = 0, 0, 3.
    out = agg(T([[1.0, 2.0, -1.0], [1.0, 2.0, -1.0], [7.0, 2.0, 2.0]]))
    close(out, T([1.0, 2.0, -1.0]))
    assert agg.last_report.best_iteration == 1


def test_smea_ties_go_to_the_first_subset():
    # 1-D points 0, 1, 2, f=1: subsets {0,1} and {1,2} both have variance 1/4, {0,2} has 1: the
    # first in lexicographic order, {0,1}, wins, mean 0.5.
    agg = SMEA(1)
    assert agg(T([[0.0], [1.0], [2.0]])).tolist() == [0.5]
    assert agg.last_report.selected == [0, 1]


def test_smea_ties_by_symmetry_in_two_dimensions():
    # The corners (1, 1), (-1, 1), (-1, -1), (1, -1) and the centre (0, 0), f = 1. Without the
    # centre the covariance is I; without a corner, say (1, 1), the deviations from the mean
    # (-1/4, -1/4) give [[11, -5], [-5, 11]] / 16, eigenvalues 1 and 3/8. All five subsets tie at
    # exactly 1, and the first, {0, 1, 2, 3}, wins: mean (-1/4, 1/4).
    G = T([[1.0, 1.0], [-1.0, 1.0], [0.0, 0.0], [-1.0, -1.0], [1.0, -1.0]])
    lams = [float(covariance_top(X64(G)[list(S)], torch.ones(4, dtype=torch.float64))[1])
            for S in itertools.combinations(range(5), 4)]
    close(F64(lams), torch.ones(5, dtype=torch.float64))
    agg = SMEA(1)
    assert agg(G).tolist() == [-0.25, 0.25]
    assert agg.last_report.selected == [0, 1, 2, 3]
    close(F64(agg.last_report.eigenvalue), F64(1.0))


@pytest.mark.parametrize("rule", [CAF, SMEA])
def test_f_zero_is_the_mean(rule):
    G = rand_G(6, 4, seed=5)
    agg = rule(0)
    close(agg(G), X64(G).mean(0))
    assert agg.last_report.selected == list(range(6))
    if rule is CAF:
        assert agg.last_report.eigenvalues == [] and agg.last_report.best_iteration is None
    else:
        assert agg.last_report.subsets == 1
        close(F64(agg.last_report.eigenvalue), covariance_top(X64(G), torch.ones(6, dtype=torch.float64))[1])


# ---------------------------------------------------------------- non-finite rows, arguments

@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_caf_and_smea_drop_a_non_finite_row(bad):
    G = rand_G(7, 4, seed=1)
    G[2, 1] = bad
    keep = [0, 1, 3, 4, 5, 6]
    for rule, ref in [(CAF, caf_ref), (SMEA, smea_ref)]:
        agg = rule(2)
        close(agg(G), ref(X64(G)[keep], 2))
        assert agg.last_report.rejected_nonfinite == [2]
        assert 2 not in agg.last_report.selected


def test_caf_and_smea_arguments_are_checked():
    with pytest.raises(ValueError, match="f=3 is too large for n=6"):
        CAF(3)(rand_G(6, 2))
    with pytest.raises(ValueError, match=r"n=30, f=10 gives C\(30, 10\) = 30045015 subsets"):
        SMEA(10)(rand_G(30, 2))
    with pytest.raises(TypeError):
        SMEA(1.5)


@pytest.mark.parametrize("seed", range(20))
def test_caf_with_duplicated_rows_in_eight_dimensions(seed):
    # Three copies of one row and two of another tie for tau_max whenever a copy is the farthest:
    # all copies must leave together, in d > 1 too (before the tie rule, 33 of 300 seeds differed).
    X = torch.randn(10, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    X[1] = X[2] = X[0]
    X[5] = X[4]
    close(CAF(3)(X), caf_ref(X, 3))
