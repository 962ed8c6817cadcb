"""The line-search attacks (optimal_ipm, optimal_alie, optimal_scale) and Mimic against plainly written
float64 versions (docs/attacks.md)."""
import math

import pytest
import torch
from conftest import DEVICE

from robustagg import aggregators as A
from robustagg import attacks


def benign(n=12, d=16, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=g, dtype=torch.float64) * 0.5 + 1.0).to(dtype).to(DEVICE)


# ---------------------------------------------------------------- plain float64 references

def trimmed_ref(X, trim):
    return X.sort(dim=0).values[trim:X.shape[0] - trim].mean(0)


def median_ref(X):
    """numpy-style: the mean of the two middle values for even n."""
    n, S = X.shape[0], X.sort(dim=0).values
    return S[n // 2] if n % 2 else S[n // 2 - 1:n // 2 + 1].mean(0)


def rows_ref(kind, X, n_byz, scale):
    mu, sigma = X.mean(0), X.std(0)
    return ((-scale * mu) if kind == "ipm" else (mu - scale * sigma)).expand(n_byz, -1)


def distance_ref(kind, X, n_byz, scale, agg):
    """||agg(honest then Byzantine) - mean(honest)|| in float64 on the CPU."""
    X = X.detach().cpu().double()
    return float((agg(torch.cat([X, rows_ref(kind, X, n_byz, scale)])) - X.mean(0)).norm())


def search_ref(f, evals, start, delta, ratio):
    """ByzFL's expansion/contraction line search, written out again from its description."""
    xs, best, fb = [start], start, f(start)
    step, used, expanding = delta, 1, True
    while used < evals:
        x = best + step
        xs.append(x)
        fx = f(x)
        used += 1
        if expanding:
            if fx > fb:
                best, fb, step = x, fx, step * 2
            else:
                step, expanding = step * ratio, False
        else:
            if fx > fb:
                best, fb = x, fx
            step *= ratio
    return best, xs


ATTACK = {"ipm": (attacks.ipm, attacks.optimal_ipm), "alie": (attacks.lie, attacks.optimal_alie)}
RULES = {   # name -> (ours, plain reference), n = 12 benign + 4 Byzantine
    "trimmed": (A.TrimmedMean(trim=4), lambda X: trimmed_ref(X, 4)),
    "median": (A.CoordinateMedian(), median_ref),
    "mean": (A.FedAvg(), lambda X: X.mean(0)),
}


@pytest.mark.parametrize("params", [{}, dict(evals=7, start=0.5, delta=-2.0, ratio=0.6),
                                    dict(evals=30, start=-1.0, delta=0.25, ratio=0.9)])
@pytest.mark.parametrize("rule", list(RULES))
@pytest.mark.parametrize("kind", list(ATTACK))
def test_search_matches_the_plain_search(kind, rule, params):
    G, n_byz = benign(), 4
    ours, ref = RULES[rule]
    found = attacks.optimal_scale(G, n_byz, ATTACK[kind][0], ours, **params)
    full = dict(evals=20, start=0.0, delta=10.0, ratio=0.8) | params
    best, xs = search_ref(lambda s: distance_ref(kind, G, n_byz, s, ref), **full)
    assert len(found.trials) == full["evals"]
    assert [s for s, _ in found.trials] == pytest.approx(xs, rel=1e-12)
    assert found.scale == pytest.approx(best, rel=1e-12)
    for s, dist in found.trials:
        assert dist == pytest.approx(distance_ref(kind, G, n_byz, s, ref), rel=1e-9, abs=1e-12)
    # The best is the largest over the grid it evaluated (a brute search over the same points).
    assert found.distance == max(d for _, d in found.trials)
    out = ATTACK[kind][1](G, n_byz, ours, **params)
    assert out.shape == (n_byz, 16)
    torch.testing.assert_close(out.cpu(), rows_ref(kind, G.cpu(), n_byz, found.scale))


@pytest.mark.parametrize("kind,fixed,rule", [("ipm", 0.5, "trimmed"), ("alie", None, "trimmed"),
                                             ("alie", None, "median")])
def test_search_beats_the_fixed_scale(kind, fixed, rule):
    # The search must find a scale that moves a trimmed mean or a median further than the fixed
    # default (eps = 0.5, the paper's z) does, by more than rounding (~1e-15 relative). (IPM against
    # a median is flat: for any eps > 0 the Byzantine rows sit below every honest value.)
    G, n_byz = benign(), 4
    ours, ref = RULES[rule]
    fixed = attacks.lie_z(16, 4) if fixed is None else fixed
    found = attacks.optimal_scale(G, n_byz, ATTACK[kind][0], ours)
    assert found.distance > (1 + 1e-3) * distance_ref(kind, G, n_byz, fixed, ref)


def test_non_finite_trials_never_win():
    # An aggregate that turns NaN past a threshold: those trials count as -inf, the best stays finite.
    G = benign()

    def agg(X):
        return X.mean(0) if float(X.abs().max()) < 50 else torch.full_like(X[0], math.nan)

    found = attacks.optimal_scale(G, 4, attacks.ipm, agg)
    assert any(d == -math.inf for _, d in found.trials)
    assert math.isfinite(found.distance) and abs(found.scale) * float(G.mean(0).abs().max()) < 50


def test_stateful_aggregator_is_left_as_it_was():
    G = benign()
    cc = A.CenteredClipping(tau=1.0, iters=1)
    cc(G)
    before = {k: v.clone() for k, v in cc.state_dict().items()}
    first = attacks.optimal_ipm(G, 3, cc)
    assert all(torch.equal(v, cc.state_dict()[k]) for k, v in before.items())
    assert torch.equal(first, attacks.optimal_ipm(G, 3, cc))   # every trial met the same state


def test_far_row_keeps_the_distance_finite():
    G = benign()
    G[0] = 1e300
    found = attacks.optimal_scale(G, 2, attacks.ipm, A.CoordinateMedian())
    assert math.isfinite(found.distance) and found.distance > 1e299


@pytest.mark.parametrize("name", list(attacks.ADAPTIVE_ATTACKS))
def test_adaptive_attacks_keep_dtype_and_shape_and_work_through_apply(name):
    attack = attacks.ADAPTIVE_ATTACKS[name]
    G = benign(dtype=torch.float32)
    out = attack(G, 4, A.TrimmedMean(trim=4))
    assert out.shape == (4, 16) and out.dtype == torch.float32
    updates = torch.cat([G, torch.zeros(4, 16, device=G.device)])
    poisoned = attacks.apply(updates, [12, 13, 14, 15], attack, aggregator=A.TrimmedMean(trim=4))
    assert torch.equal(poisoned[12:], out)
    assert not set(attacks.ADAPTIVE_ATTACKS) & set(attacks.ATTACKS)


def test_zero_attackers_search_nothing():
    found = attacks.optimal_scale(benign(), 0, attacks.ipm, A.FedAvg())
    assert found.scale == 0.0 and attacks.optimal_ipm(benign(), 0, A.FedAvg()).shape == (0, 16)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(evals=0), ValueError, r"optimal_ipm: evals=0 is out of range; allowed >= 1"),
    (dict(evals=2.0), TypeError, r"optimal_ipm: evals must be an int"),
    (dict(start=math.nan), ValueError, r"optimal_ipm: start=nan is out of range"),
    (dict(delta=0.0), ValueError, r"optimal_ipm: delta=0.0 is out of range; allowed non-zero"),
    (dict(delta=math.inf), ValueError, r"optimal_ipm: delta=inf is out of range"),
    (dict(ratio=0.5), ValueError, r"optimal_ipm: ratio=0.5 is out of range; allowed in \(0.5, 1.0\)"),
    (dict(ratio=1.0), ValueError, r"optimal_ipm: ratio=1.0 is out of range; allowed in \(0.5, 1.0\)"),
    (dict(ratio="0.8"), TypeError, r"optimal_ipm: ratio must be a real number"),
    (dict(pre=lambda X: X), TypeError, r"optimal_ipm: pre must be a sequence of callables"),
    (dict(pre=[1]), TypeError, r"optimal_ipm: pre holds 1, which is not callable"),
    (dict(pre=[lambda X: X[:, :3]]), ValueError, r"optimal_ipm: pre step .* must return an \(n', 16\) tensor"),
])
def test_search_arguments_are_checked(kwargs, error, match):
    with pytest.raises(error, match=match):
        attacks.optimal_ipm(benign(), 2, A.FedAvg(), **kwargs)


def test_aggregator_is_checked():
    with pytest.raises(TypeError, match="optimal_alie: aggregator must be an aggregator or a callable"):
        attacks.optimal_alie(benign(), 2, "median")
    with pytest.raises(ValueError, match=r"optimal_alie: the aggregator returned .* \[16\] tensor"):
        attacks.optimal_alie(benign(), 2, lambda X: X)
    with pytest.raises(ValueError, match="at least 2 benign rows"):
        attacks.optimal_alie(benign(1), 2, A.FedAvg())


# ---------------------------------------------------------------- Mimic

def mimic_target_ref(X):
    """The paper's heuristic from its definition, in d x d (small d only): the top eigenvector z of
    the covariance sum_i (g_i - mu)(g_i - mu)^T, then argmax_i |<g_i - mu, z>|."""
    X = X.detach().cpu().double()
    Y = X - X.mean(0)
    _, V = torch.linalg.eigh(Y.T @ Y)
    return int(torch.argmax((Y @ V[:, -1]).abs()))


@pytest.mark.parametrize("seed", range(5))
def test_mimic_default_target_is_the_top_principal_client(seed):
    G = benign(seed=seed)
    G[seed + 3] += 2.0 * torch.randn(16, generator=torch.Generator().manual_seed(seed), dtype=G.dtype).to(DEVICE)
    assert attacks.mimic_target(G) == mimic_target_ref(G) == seed + 3
    assert torch.equal(attacks.mimic(G, 3), G[seed + 3].expand(3, -1))


def test_mimic_target_on_random_rows_matches_the_reference():
    for seed in range(10):
        G = benign(seed=seed)
        assert attacks.mimic_target(G) == mimic_target_ref(G), seed


@pytest.mark.parametrize("dtype,far", [(torch.float64, 1e300), (torch.float32, 3e38)])
def test_mimic_target_with_a_far_row(dtype, far):
    G = benign(dtype=dtype)
    G[5] = far
    assert attacks.mimic_target(G) == 5
    assert torch.equal(attacks.mimic(G, 2), G[5].expand(2, -1))


def test_mimic_never_picks_a_nan_row_unless_told():
    G = benign()
    G[4] += 5.0
    G[4, 0] = math.nan
    target = attacks.mimic_target(G)
    assert target != 4 and target == [i for i in range(12) if i != 4][mimic_target_ref(G[torch.arange(12) != 4])]
    assert torch.isnan(attacks.mimic(G, 1, target=4)[0, 0])
    with pytest.raises(ValueError, match="every benign row holds NaN or Inf"):
        attacks.mimic(torch.full((3, 4), math.nan), 1)


def test_mimic_identical_rows_give_row_zero_and_explicit_targets():
    G = benign(1).expand(4, -1).clone()
    assert attacks.mimic_target(G) == 0
    G = benign()
    assert torch.equal(attacks.mimic(G, 2, target=7), G[7].expand(2, -1))
    with pytest.raises(ValueError, match=r"mimic: target=12 is out of range; allowed in \[0, 11\]"):
        attacks.mimic(G, 2, target=12)
    with pytest.raises(TypeError, match="mimic: target must be an int"):
        attacks.mimic(G, 2, target=1.0)
