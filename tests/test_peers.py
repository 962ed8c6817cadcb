"""Cross-checks against a peer library: ByzFL (EPFL's Byzantine-robust FL library, PyPI ``byzfl``
0.0.11), on every rule both libraries implement, in float64, on random and on adversarial inputs.

The two libraries do not always mean the same thing by the same parameter. Each test maps ByzFL's
convention onto ours explicitly; the comment at the head of each section says why. ByzFL is given
float64 numpy arrays, never torch tensors: its ``utils.misc.check_vectors_type`` casts torch inputs
to float32 (``.float()``) but keeps a numpy array's dtype. Rules only one library has (ByzFL's
MDA, MoNNA, Meamed, CAF, SMEA, NNM, Bucketing, ARC, Mimic; our Bulyan, DnC, SignGuard, ...) are
not compared.
"""
import contextlib
import importlib
import importlib.metadata
import importlib.util
import math

import numpy as np
import pytest
import torch
from conftest import DEVICE, RESOLUTION

import robustagg
from robustagg import aggregators as A
from robustagg import attacks
from robustagg.bench.peers import byzfl_module

BYZFL_VERSION = "0.0.11"   # the conventions mapped below are those of this release (pinned in the Makefile)


def import_byzfl():
    """ByzFL's ``aggregators`` and ``attacks`` subpackages, imported without torchvision
    (robustagg.bench.peers.byzfl_module says how), or a skip of this module."""
    if importlib.util.find_spec("byzfl") is None:
        pytest.skip(f"ByzFL is not installed (`pip install --no-deps byzfl=={BYZFL_VERSION}`, "
                    "which `make setup` runs)", allow_module_level=True)
    version = importlib.metadata.version("byzfl")
    if version != BYZFL_VERSION:
        pytest.skip(f"ByzFL {version} is installed; these cross-checks map the conventions of "
                    f"ByzFL {BYZFL_VERSION}", allow_module_level=True)
    return byzfl_module("aggregators"), byzfl_module("attacks")


byzfl_aggregators, byzfl_attacks = import_byzfl()


# ---------------------------------------------------------------- calling each library

def peer(rule, X: np.ndarray) -> torch.Tensor:
    """A ByzFL rule on a float64 copy of X, back as a float64 tensor.

    A copy, because ByzFL's ``Clipping`` writes the clipped rows into its input array.
    """
    out = rule(np.array(X, dtype=np.float64, copy=True))
    return torch.from_numpy(np.array(out, dtype=np.float64))


def ours(rule, X: np.ndarray) -> torch.Tensor:
    """A robustagg aggregator (or any callable of an [n, d] tensor) on X, back on the CPU."""
    return rule(torch.from_numpy(np.array(X, dtype=np.float64)).to(DEVICE)).cpu()


def close(actual, expected, atol=None, rtol=None):
    """float64 agreement; both libraries do the same arithmetic up to summation order."""
    default_atol, default_rtol = RESOLUTION[torch.float64]
    torch.testing.assert_close(actual.double(), expected.double(), atol=default_atol if atol is None else atol,
                               rtol=default_rtol if rtol is None else rtol)


@contextlib.contextmanager
def numpy_seed(seed):
    """ByzFL's numpy path draws from numpy's global RNG; seed it, and put the caller's state back."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


# ---------------------------------------------------------------- inputs

FAR = 1e30        # one row this far: squared distances ~1e60, still finite in float64
FAR_GROUP = 1e18  # a few rows here, 1e9 apart: their norms^2 (1e36) dwarf their distances^2 (1e18)


def far_count(n):
    """How many rows the "few_far" case moves away: fewer than n/3, at least 1."""
    return max(1, (n - 1) // 3)


def rows(case, n, d, seed=0):
    """An [n, d] float64 numpy matrix of one named kind.

    random   - N(0.5, 1) entries;
    one_far  - random, with the middle row set to 1e30 in every entry;
    few_far  - random, with far_count(n) rows near 1e18 (entries 1e18 * (1 + 1e-9 u), u ~ N(0, 1));
    zero_row - random, with row 0 all zeros (also the zero center of the first centered clipping);
    ties     - entries in {-1, -0.0, +0.0, 1} and row 1 a copy of row 0: exact ties everywhere.
    """
    rng = np.random.default_rng(seed)
    X = rng.normal(0.5, 1.0, (n, d))
    if case == "one_far":
        X[n // 2] = FAR
    elif case == "few_far":
        k = far_count(n)
        X[n - k:] = FAR_GROUP * (1 + 1e-9 * rng.normal(size=(k, d)))
    elif case == "zero_row":
        X[0] = 0.0
    elif case == "ties":
        X = rng.integers(-1, 2, (n, d)).astype(np.float64)
        X[X == 0] = rng.choice([0.0, -0.0], size=int((X == 0).sum()))
        X[1] = X[0]
    else:
        assert case == "random", case
    return X


CASES = ["random", "one_far", "few_far", "zero_row", "ties"]
SIZES = [(3, 5), (4, 8), (5, 13), (7, 16), (20, 50)]   # (n, d): n small (3..7) and larger (20)


def size_params(sizes=SIZES):
    return [pytest.param(n, d, id=f"n{n}-d{d}") for n, d in sizes]


# ---------------------------------------------------------------- mean, median, trimmed mean

@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("n,d", size_params())
def test_fedavg_matches_average(case, n, d):
    # Average is the plain mean; FedAvg without weights is the same.
    X = rows(case, n, d)
    close(ours(A.FedAvg(), X), peer(byzfl_aggregators.Average(), X))


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("n,d", size_params())
def test_coordinate_median_matches_median(case, n, d):
    # Both take the mean of the two middle values for even n: ByzFL's numpy path is np.median (its
    # torch path is torch.quantile(q=0.5), which interpolates to the same value); ours is
    # numpy-style. The sign of a zero result may differ ([-0, -0] gives +0 in numpy, -0 in ours);
    # assert_close compares values, so it does not look at that.
    X = rows(case, n, d)
    close(ours(A.CoordinateMedian(), X), peer(byzfl_aggregators.Median(), X))


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("n,d", size_params())
def test_trimmed_mean_matches_trmean(case, n, d):
    # ByzFL's TrMean(f) sorts each coordinate and averages [f:n-f]: its f is our trim (a count of
    # values dropped at each end), and both need n - 2f >= 1. f = 0 is the plain mean in both.
    X = rows(case, n, d)
    for trim in sorted({0, 1, (n - 1) // 2}):
        close(ours(A.TrimmedMean(trim=trim), X), peer(byzfl_aggregators.TrMean(f=trim), X))


# ---------------------------------------------------------------- Krum and Multi-Krum
#
# Blanchard et al. (2017) score a point by its n - f - 2 closest *other* points; ours does the same.
# ByzFL's Krum(f) sorts each row of the squared-distance matrix, drops the first entry (the point's
# zero distance to itself) and averages the next n - f - 1: it counts n - f neighbours including
# the point itself, i.e. n - f - 1 others. So ByzFL's Krum(f) is our Krum(f - 1) (the mean
# instead of the sum does not change the ranking), and ByzFL's condition 2f < n is exactly our
# n >= 2(f - 1) + 3. ByzFL's f = 0 (all n - 1 others) would be our f = -1, so it is not compared.
# ByzFL's MultiKrum(f) averages the n - f best, with the same scores: our MultiKrum(f - 1, m=n - f)
# (our default m would be n - (f - 1)).
# Ties: numpy's argmin takes the lowest index, as ours does. ByzFL squares Euclidean distances
# (scipy's cdist, then ** 2) where we sum squared differences, so scores that tie only by
# coincidence may differ in the last bit; ties by symmetry (the same multiset of distances) stay
# exact in both, and test_krum_ties_go_to_the_lower_index uses those.

KRUM_CASES = ["random", "one_far", "few_far", "zero_row"]


def byzfl_f_values(case, n):
    """ByzFL's f: at least the far rows (so no honest score sums distances of 1e36, whose rounding
    would then rank the honest rows), and the largest allowed, (n - 1) // 2."""
    least = far_count(n) if case == "few_far" else 1
    return sorted({least, (n - 1) // 2})


@pytest.mark.parametrize("case", KRUM_CASES)
@pytest.mark.parametrize("n,d", size_params())
def test_krum_matches_krum(case, n, d):
    X = rows(case, n, d, seed=1)
    for f in byzfl_f_values(case, n):
        # Krum returns one input row: exactly equal, not just close.
        assert torch.equal(ours(A.Krum(f=f - 1), X), peer(byzfl_aggregators.Krum(f=f), X)), f


@pytest.mark.parametrize("case", KRUM_CASES)
@pytest.mark.parametrize("n,d", size_params())
def test_multikrum_matches_multikrum(case, n, d):
    X = rows(case, n, d, seed=1)
    for f in byzfl_f_values(case, n):
        close(ours(A.MultiKrum(f=f - 1, m=n - f), X), peer(byzfl_aggregators.MultiKrum(f=f), X))


def test_krum_neighbour_count_is_shifted_by_one():
    # 1-D points 0, 0.1, 10, 11, 12 (n = 5). With 3 neighbours (ByzFL f=1, our f=0) the scores are
    # 221.01, 216.83, 103.01, 120.81, 146.61: 10 wins. With 2 (our f=1) they are 100.01, 98.02, 5,
    # 2, 5: 11 wins. So the same f does not mean the same rule.
    X = np.array([[0.0, 0.0], [0.1, 0.0], [10.0, 0.0], [11.0, 0.0], [12.0, 0.0]])
    assert peer(byzfl_aggregators.Krum(f=1), X).tolist() == [10.0, 0.0]
    assert ours(A.Krum(f=0), X).tolist() == [10.0, 0.0]
    assert ours(A.Krum(f=1), X).tolist() == [11.0, 0.0]


@pytest.mark.parametrize("far_at", [0, 2, 4])
def test_krum_ties_go_to_the_lower_index(far_at):
    # Four corners of the unit square and one far point (n = 5, ByzFL f=1 -> our f=0, 3 others):
    # every corner scores 1 + 1 + 2, so the first corner in row order wins in both; Multi-Krum
    # keeps the n - f = 4 corners, whose mean is the centre.
    corners = [[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]
    X = np.array(corners[:far_at] + [[100.0, 100.0]] + corners[far_at:])
    first_corner = X[1] if far_at == 0 else X[0]
    assert peer(byzfl_aggregators.Krum(f=1), X).tolist() == first_corner.tolist()
    assert ours(A.Krum(f=0), X).tolist() == first_corner.tolist()
    assert peer(byzfl_aggregators.MultiKrum(f=1), X).tolist() == [0.5, 0.5]
    assert ours(A.MultiKrum(f=0, m=4), X).tolist() == [0.5, 0.5]


# ---------------------------------------------------------------- geometric median
#
# Both run the smoothed Weiszfeld iteration of Pillutla et al. (RFA):
# beta_i = alpha_i / max(nu, ||z - g_i||), z <- sum_i beta_i g_i / sum_i beta_i, uniform alpha.
# They differ in everything around it:
#   start   ByzFL z_0 = 0;              ours z_0 = the (weighted) mean;
#   stop    ByzFL exactly T steps;      ours when ||z_{t+1} - z_t|| <= tol ||z_t||, or max_iter;
#   default ByzFL nu=0.1, T=3;          ours nu=1e-6, max_iter=100, tol=1e-7;
#   Inf     ByzFL drops rows holding an Inf (alpha stays 1/n of all rows: uniform, so it cancels);
#           ours drops rows holding NaN or Inf (nonfinite="drop").
# Iterates are compared exactly through translation: the iteration commutes with shifting every
# point, so ByzFL run on X - mean(X) starts at our start point, and mean(X) + its T-th iterate is
# ours with max_iter=T, tol=0. Converged results are compared with both run to the fixed point.

def byzfl_geometric_median_from_the_mean(X, nu, T):
    shift = X.mean(axis=0)
    return torch.from_numpy(shift) + peer(byzfl_aggregators.GeometricMedian(nu=nu, T=T), X - shift)


@pytest.mark.parametrize("case", ["random", "zero_row", "ties"])
@pytest.mark.parametrize("nu,T", [(0.1, 3), (1e-6, 10)])   # ByzFL's defaults, and ours' nu
@pytest.mark.parametrize("n,d", size_params())
def test_geometric_median_iterates_match(case, nu, T, n, d):
    X = rows(case, n, d, seed=2)
    # T steps of the same map from the same point: the only difference is rounding (summation
    # order, and the shift by the mean), ~1e-15 relative per step.
    close(ours(A.GeometricMedian(nu=nu, max_iter=T, tol=0.0), X), byzfl_geometric_median_from_the_mean(X, nu, T),
          atol=1e-10, rtol=1e-10)


# Enough steps for both to reach the fixed point of the smoothed objective from their own starts.
# Weiszfeld converges linearly. Measured on these inputs: ByzFL (from 0) is within 1e-14 of its
# limit after at most 300 steps, ours stops (a step <= 1e-13 ||z||) after at most 240, and the two
# are within 7e-13 ||z|| of each other. 1000 steps and a 1e-9 tolerance leave a wide margin.
CONVERGED_STEPS = 1000
CONVERGED_TOL = 1e-13


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("n,d", size_params())
def test_geometric_median_converged_matches(case, n, d):
    X = rows(case, n, d, seed=2)
    expected = peer(byzfl_aggregators.GeometricMedian(nu=1e-6, T=CONVERGED_STEPS), X)
    agg = A.GeometricMedian(nu=1e-6, max_iter=CONVERGED_STEPS, tol=CONVERGED_TOL)
    actual = ours(agg, X)
    assert agg.last_report.converged
    # 1e-9 relative to the size of the median (at least 1): the measured 7e-13, with room.
    scale = max(float(expected.norm()), 1.0)
    close(actual, expected, atol=1e-9 * scale, rtol=0.0)


@pytest.mark.parametrize("X,expected", [
    # Unit vectors from (1.5, 1.5) to the three near points cancel in pairs with the far point's.
    ([[3.0, 0.0], [0.0, 0.0], [0.0, 3.0], [FAR, FAR]], [1.5, 1.5]),
    # On the x-axis by symmetry; at (x, 0) the unit vectors sum to 1 - 1 - 2x/sqrt(x^2+1) + 1 = 0
    # for x = 1/sqrt(3).
    ([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0], [FAR_GROUP, 0.0]], [1 / math.sqrt(3), 0.0]),
], ids=["far-1e30", "far-1e18"])
def test_geometric_median_ignores_a_far_row(X, expected):
    # Our defaults (stop at a step <= 1e-7 ||z||) against the hand value: 1e-6 leaves room for the
    # distance still to go at that step. ByzFL needs more than its default 3 steps (from z = 0 it
    # first leaves the data point (0, 0) where nu = 1e-6 pins it); 200 are plenty.
    X = np.array(X)
    expected = torch.tensor(expected, dtype=torch.float64)
    close(peer(byzfl_aggregators.GeometricMedian(nu=1e-6, T=200), X), expected, atol=1e-9, rtol=0.0)
    agg = A.GeometricMedian()
    close(ours(agg, X), expected, atol=1e-6, rtol=0.0)
    assert agg.last_report.converged


def test_geometric_median_drops_an_inf_row_like_byzfl():
    # ByzFL's Inf attack sends an all-Inf row; ByzFL's GeometricMedian filters rows holding an Inf
    # and ours drops non-finite rows, so both give the median of the finite rows.
    X = rows("random", 7, 9, seed=3)
    X = np.vstack([X, peer(byzfl_attacks.Inf(), X).numpy()])
    expected = peer(byzfl_aggregators.GeometricMedian(nu=1e-6, T=CONVERGED_STEPS), X)
    agg = A.GeometricMedian(max_iter=CONVERGED_STEPS, tol=CONVERGED_TOL)
    close(ours(agg, X), expected, atol=1e-9, rtol=0.0)
    assert agg.last_report.rejected_nonfinite == [7]


# ---------------------------------------------------------------- centered clipping
#
# Karimireddy et al. (2021): v <- v + (1/n) sum_i (g_i - v) min(1, tau / ||g_i - v||), L times.
# ByzFL CenteredClipping(m=None, L, tau) is ours CenteredClipping(tau, iters=L). Both are stateful
# the same way: the center starts at zeros and each call's output is the next call's center.
# Defaults differ (ByzFL L=1, tau=100.0; ours iters=1, tau=10.0), so both are always passed. ByzFL's
# m (an initial center) cannot be used in 0.11: its type check `not isinstance(m, np.ndarray) or
# not isinstance(m, torch.Tensor)` rejects every m; ours sets a center through load_state_dict.
# ByzFL divides tau by ||g_i - v|| unguarded: a row equal to the center gives tau / 0 = inf, then
# min(1, inf) = 1 times a zero difference, the right answer with a numpy warning, silenced here.

@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("iters", [1, 3])
@pytest.mark.parametrize("n,d", size_params())
def test_centered_clipping_rounds_match(case, iters, n, d):
    tau = 1.0   # below the typical ||g_i - v|| here (~sqrt(d)), so rows are clipped in every round
    mine = A.CenteredClipping(tau=tau, iters=iters)
    theirs = byzfl_aggregators.CenteredClipping(L=iters, tau=tau)
    for round_ in range(3):
        X = rows(case, n, d, seed=10 + round_)
        with np.errstate(divide="ignore"):
            expected = peer(theirs, X)
        close(ours(mine, X), expected, atol=1e-12 * math.sqrt(d), rtol=1e-12)


def test_centered_clipping_hand_case():
    # From v = 0 with tau = 1: (3, 4) has norm 5 and is clipped to (0.6, 0.8); the two zero rows
    # equal the center and stay. v = (0.6, 0.8) / 3.
    X = np.array([[3.0, 4.0], [0.0, 0.0], [0.0, 0.0]])
    expected = torch.tensor([0.2, 0.8 / 3], dtype=torch.float64)
    with np.errstate(divide="ignore"):
        close(peer(byzfl_aggregators.CenteredClipping(L=1, tau=1.0), X), expected)
    close(ours(A.CenteredClipping(tau=1.0, iters=1), X), expected)


# ---------------------------------------------------------------- static clipping
#
# ByzFL's Clipping(c) is a pre-aggregator: it returns the n rows, each scaled to norm <= c (rows with
# norm exactly c, and zero rows, are left as they are), which is our clip_rows(G, c). ByzFL's c
# defaults to 2.0; ours has no default. NormClipping(max_norm=c) is the mean of those rows, i.e.
# ByzFL's Average after its Clipping.

@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("c", [0.0, 1.0, 4.0])
@pytest.mark.parametrize("n,d", size_params())
def test_clip_rows_matches_clipping(case, c, n, d):
    X = rows(case, n, d)
    close(ours(lambda G: robustagg.clip_rows(G, c), X), peer(byzfl_aggregators.Clipping(c=c), X))


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("n,d", size_params())
def test_norm_clipping_matches_average_of_clipped(case, n, d):
    X = rows(case, n, d)
    clipped = peer(byzfl_aggregators.Clipping(c=2.0), X).numpy()
    close(ours(A.NormClipping(max_norm=2.0), X), peer(byzfl_aggregators.Average(), clipped))


def test_clipping_hand_case():
    # Norm 5 = c is kept (the test is norm > c), norm 10 is halved, the zero row stays.
    X = np.array([[3.0, 4.0], [6.0, 8.0], [0.0, 0.0]])
    expected = torch.tensor([[3.0, 4.0], [3.0, 4.0], [0.0, 0.0]], dtype=torch.float64)
    close(peer(byzfl_aggregators.Clipping(c=5.0), X), expected)
    close(ours(lambda G: robustagg.clip_rows(G, 5.0), X), expected)


# ---------------------------------------------------------------- attacks
#
# ByzFL's attacks take the honest vectors and return ONE vector (every Byzantine client sends it);
# ours take (G_benign, n_byz) and return n_byz rows. So each of our rows is compared to ByzFL's one.

ATTACK_CASES = ["random", "one_far", "zero_row", "ties"]
ATTACK_SIZES = [(3, 5), (7, 16), (20, 50)]   # n here is the number of benign rows


def our_attack(attack, X, n_byz, **params):
    return attack(torch.from_numpy(X).to(DEVICE), n_byz, **params).cpu()


def assert_every_row(rows_, vector):
    assert rows_.dim() == 2 and rows_.shape[1] == vector.shape[0]
    for row in rows_:
        close(row, vector)


@pytest.mark.parametrize("case", ATTACK_CASES)
@pytest.mark.parametrize("n,d", size_params(ATTACK_SIZES))
def test_sign_flip_matches_sign_flipping(case, n, d):
    # Both send minus the benign mean.
    X = rows(case, n, d)
    out = our_attack(attacks.sign_flip, X, 3)
    assert out.shape == (3, d)
    assert_every_row(out, peer(byzfl_attacks.SignFlipping(), X))


@pytest.mark.parametrize("case", ATTACK_CASES)
@pytest.mark.parametrize("eps", [0.1, 0.5, 2.0, 100.0])
@pytest.mark.parametrize("n,d", size_params(ATTACK_SIZES))
def test_ipm_matches_inner_product_manipulation(case, eps, n, d):
    # Xie et al. (2020): -eps * benign mean. ByzFL calls eps tau (default 2.0); ours eps (default 0.5).
    X = rows(case, n, d)
    assert_every_row(our_attack(attacks.ipm, X, 2, eps=eps), peer(byzfl_attacks.InnerProductManipulation(tau=eps), X))


def test_ipm_defaults_differ_by_the_scale_only():
    X = rows("random", 7, 16)
    assert_every_row(our_attack(attacks.ipm, X, 1), peer(byzfl_attacks.InnerProductManipulation(tau=0.5), X))
    assert_every_row(our_attack(attacks.ipm, X, 1, eps=2.0), peer(byzfl_attacks.InnerProductManipulation(), X))


@pytest.mark.parametrize("case", ATTACK_CASES)
@pytest.mark.parametrize("tau", [0.5, 1.5, 3.0])
@pytest.mark.parametrize("n,d", size_params(ATTACK_SIZES))
def test_lie_matches_a_little_is_enough(case, tau, n, d):
    # ByzFL's ALittleIsEnough(tau) sends mean + tau * std, ours mu - z * sigma (both the unbiased
    # std, ddof=1, of the benign rows): ByzFL's tau is our -z.
    X = rows(case, n, d)
    assert_every_row(our_attack(attacks.lie, X, 2, z=-tau), peer(byzfl_attacks.ALittleIsEnough(tau=tau), X))


@pytest.mark.parametrize("n_benign,n_byz", [(7, 3), (15, 5), (38, 12)])
def test_lie_default_z_maps_to_a_little_is_enough_tau(n_benign, n_byz):
    # ByzFL has no rule for z: its tau is fixed (default 1.5). Ours defaults to Baruch et al.'s
    # z = Phi^-1((n - s) / n), s = floor(n/2 + 1) - f, for n = benign + byzantine and f = byzantine;
    # sent through ByzFL as tau = -z it gives the same rows.
    X = rows("random", n_benign, 10)
    z = attacks.lie_z(n_benign + n_byz, n_byz)
    out = our_attack(attacks.lie, X, n_byz)
    assert out.shape == (n_byz, 10)
    assert_every_row(out, peer(byzfl_attacks.ALittleIsEnough(tau=-z), X))


def test_gaussian_draws_the_same_distribution():
    # Randomized: the two libraries draw from different RNGs (numpy's global one in ByzFL, a torch
    # generator in ours), so only the distribution can agree. ByzFL's Gaussian(mu, sigma) sends one
    # N(mu, sigma^2 I) vector, ignoring the honest vectors; ours N(0, sigma^2 I) rows, so mu = 0.
    # 20000 numbers each: a two-sample Kolmogorov-Smirnov test at fixed seeds (a deterministic
    # p-value: 0.26 here, while a 10% larger sigma gives 8e-5), and the mean and standard deviation
    # within 5 standard errors of 0 and sigma.
    scipy_stats = pytest.importorskip("scipy.stats")
    sigma, d, draws = 2.0, 40, 500
    X = rows("random", 5, d)
    with numpy_seed(0):
        theirs = np.concatenate([peer(byzfl_attacks.Gaussian(mu=0.0, sigma=sigma), X).numpy() for _ in range(draws)])
    out = our_attack(attacks.gaussian, X, draws, sigma=sigma, generator=torch.Generator().manual_seed(0))
    assert out.shape == (draws, d)
    mine = out.double().numpy().ravel()
    assert scipy_stats.ks_2samp(mine, theirs).pvalue > 1e-3
    assert scipy_stats.ks_2samp(mine, theirs * 1.1).pvalue < 1e-3   # the test can tell a 10% scale apart
    for sample in (mine, theirs):
        error = sigma / math.sqrt(sample.size)
        assert abs(sample.mean()) < 5 * error
        assert abs(sample.std() - sigma) < 5 * error


def test_inf_attack_matches_nan_inject_inf():
    # ByzFL's Inf sends one all-+Inf vector; ours nan_inject(kind="inf") sends n_byz of them.
    X = rows("random", 5, 7)
    out = our_attack(attacks.nan_inject, X, 2, kind="inf")
    expected = peer(byzfl_attacks.Inf(), X)
    assert torch.isposinf(expected).all()
    assert torch.equal(out, expected.expand(2, -1))
