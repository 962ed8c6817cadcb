"""Each attack against its formula (docs/attacks.md)."""
import decimal
import math
from statistics import NormalDist

import pytest
import torch
from conftest import DEVICE, assert_close, with_bad_rows

from robustagg import attacks


def benign(n=20, d=64, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=g, dtype=torch.float64) * 0.5 + 1.0).to(dtype).to(DEVICE)


def test_lie_default_z_follows_baruch():
    # n = 50, f = 10: s = floor(26) - 10 = 16, z = Phi^-1(34/50) ~ 0.4677
    assert attacks.lie_z(50, 10) == pytest.approx(NormalDist().inv_cdf(0.68))
    assert attacks.lie_z(50, 10) == pytest.approx(0.4677, abs=1e-4)


def test_lie_rows_are_mean_minus_z_std():
    G = benign()
    out = attacks.lie(G, 4, z=1.5)
    expected = G.mean(0) - 1.5 * G.std(0, unbiased=True)
    assert out.shape == (4, 64)
    torch.testing.assert_close(out, expected.expand(4, -1))
    default = attacks.lie(G, 4)
    z = attacks.lie_z(24, 4)
    torch.testing.assert_close(default[0], G.mean(0) - z * G.std(0))


def test_lie_needs_two_benign_rows():
    with pytest.raises(ValueError, match="at least 2 benign rows"):
        attacks.lie(benign(1), 2, z=1.0)


@pytest.mark.parametrize("n_byz,m1", [(4, None), (5, 1), (6, 0)])
def test_byzmean_makes_the_overall_mean_equal_g1(n_byz, m1):
    G = benign()
    out = attacks.byzmean(G, n_byz, m1=m1, z=1.0)
    g1 = G.mean(0) - 1.0 * G.std(0)
    m1 = n_byz // 2 if m1 is None else m1
    torch.testing.assert_close(out[:m1], g1.expand(m1, -1))
    torch.testing.assert_close(torch.cat([G, out]).mean(0), g1)


def test_byzmean_needs_a_g2_row():
    with pytest.raises(ValueError, match="m1=3 must be in"):
        attacks.byzmean(benign(), 3, m1=3)


# ---------------------------------------------------------------- Min-Max and Min-Sum

AGR_AGNOSTIC = {"min_max": True, "min_sum": False}   # name -> use_max
PERTURBATIONS = ["unit", "std", "sign"]


def far_row(dtype=torch.float64):
    G = benign(dtype=torch.float64)
    G[3] += 1e3
    return G.to(dtype)


BENIGN_SETS = {
    "random": lambda dtype: benign(dtype=dtype),
    "tiny": lambda dtype: (benign() * 1e-3).to(dtype),
    "huge": lambda dtype: (benign() * 1e3).to(dtype),
    "far_row": far_row,
}


def perturbation_ref(X, kind):
    mu = X.mean(0)
    return {"unit": -mu / mu.norm(), "std": -X.std(0), "sign": -torch.sign(mu)}[kind]


def constraint_ref(G, kind, name):
    """Shejwalkar & Houmansadr's constraint from its definition, in float64 on the CPU: lhs(gamma)
    from the distances of the row mu + gamma p itself (not the attack's quadratic expansion), and
    the bound from the differences of the benign rows."""
    X = G.detach().to("cpu", torch.float64)
    mu, p = X.mean(0), perturbation_ref(X, kind)
    D = ((X[:, None] - X[None]) ** 2).sum(-1)
    bound = (D.max() if AGR_AGNOSTIC[name] else D.sum(1).max()).item()

    def lhs(gamma):
        sq = ((mu + gamma * p - X) ** 2).sum(1)
        return (sq.max() if AGR_AGNOSTIC[name] else sq.sum()).item()
    return lhs, bound


def gamma_of(name, G, kind, search="exact", gamma_init=10.0, tol=1e-5):
    return attacks._agr_agnostic(G, 1, kind, search, gamma_init, tol, name, AGR_AGNOSTIC[name])[2]


def bisection_ref(lhs, bound):
    """200 halvings of a bracket [lo, hi] with lhs(lo) <= bound < lhs(hi): slow and plainly right."""
    lo, hi = 0.0, 1.0
    while lhs(hi) <= bound:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if lhs(mid) <= bound else (lo, mid)
    return lo


def released_search(fits, lamda=10.0, threshold_diff=1e-5):
    """The loop of Shejwalkar & Houmansadr's released code, their names kept."""
    lamda_fail, lamda_succ = lamda, 0.0
    while abs(lamda_succ - lamda) > threshold_diff:
        if fits(lamda):
            lamda_succ = lamda
            lamda = lamda + lamda_fail / 2
        else:
            lamda = lamda - lamda_fail / 2
        lamda_fail = lamda_fail / 2
    return lamda_succ


@pytest.mark.parametrize("benign_set", list(BENIGN_SETS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", PERTURBATIONS)
@pytest.mark.parametrize("name", list(AGR_AGNOSTIC))
def test_exact_gamma_is_the_largest_that_fits(name, kind, dtype, benign_set):
    G = BENIGN_SETS[benign_set](dtype)
    lhs, bound = constraint_ref(G, kind, name)
    gamma = gamma_of(name, G, kind)
    assert gamma > 0
    # Satisfied and active: equal to the bound up to the rounding of the two evaluations (~1e-15 measured).
    assert lhs(gamma) == pytest.approx(bound, rel=1e-12, abs=0)
    # Maximal: the constraint grows by at least (bound - max_i A_i) / bound >= ~2/n of it per unit
    # relative step, so 1e-9 further is ~1e-10 over the bound, far above rounding.
    assert lhs(gamma * (1 + 1e-9)) > bound


@pytest.mark.parametrize("half_slope,slack", [(1e8, 1.0), (-1e8, 1.0), (3.0, 1e-20), (0.5, 2.0), (0.0, 0.0)])
def test_upper_root_does_not_cancel(half_slope, slack):
    # For b = 1e8, s = 1 the textbook -b + sqrt(b^2 + s) is 0 in float64; the root is ~5e-9.
    with decimal.localcontext() as ctx:
        ctx.prec = 60
        b, s = decimal.Decimal(half_slope), decimal.Decimal(slack)
        expected = float(-b + (b * b + s).sqrt())
    root = attacks._upper_root(torch.tensor([half_slope], dtype=torch.float64),
                               torch.tensor([slack], dtype=torch.float64)).item()
    assert root == pytest.approx(expected, rel=1e-15, abs=0)


@pytest.mark.parametrize("kind", ["std", "sign"])
@pytest.mark.parametrize("name", list(AGR_AGNOSTIC))
def test_exact_gamma_steps_down_from_a_root_rounded_too_high(name, kind, monkeypatch):
    G = benign()
    lhs, bound = constraint_ref(G, kind, name)
    solved = gamma_of(name, G, kind)
    upper_root = attacks._upper_root
    monkeypatch.setattr(attacks, "_upper_root", lambda b, s: upper_root(b, s) * (1 + 1e-12))
    stepped = gamma_of(name, G, kind)
    # From ~4500 ulps above, the step-down stops at the largest float that fits, so at or above the
    # unpatched solution; without it the constraint would be ~1e-13 over, above rounding (~1e-15).
    assert solved <= stepped < solved * (1 + 1e-12)
    assert lhs(stepped) <= bound * (1 + 1e-14)


@pytest.mark.parametrize("name", list(AGR_AGNOSTIC))
def test_exact_search_fixes_the_authors_one_percent_error_with_sign_on_small_updates(name):
    # The issue's case: "sign" on updates around 1e-3, where gamma itself is ~6e-4. The authors' search
    # stops with its last failure at most 2 tol = 2e-5 above its last success, up to ~3% of gamma.
    g = torch.Generator().manual_seed(4)
    G = ((1.0 + 0.5 * torch.randn(20, 64, generator=g, dtype=torch.float64)) * 1e-3).to(DEVICE)
    reference = bisection_ref(*constraint_ref(G, "sign", name))
    exact = gamma_of(name, G, "sign")
    authors = gamma_of(name, G, "sign", search="authors")
    assert abs(exact - reference) <= 1e-9 * reference
    assert 1e-3 < (reference - authors) / reference < 5e-2
    assert 0 < reference - authors < 2e-5


@pytest.mark.parametrize("gamma_init,tol", [(10.0, 1e-5), (50.0, 1e-7), (1.0, 1e-3)])
@pytest.mark.parametrize("kind", PERTURBATIONS)
@pytest.mark.parametrize("name", list(AGR_AGNOSTIC))
def test_authors_search_is_the_released_loop(name, kind, gamma_init, tol):
    G = benign()
    lhs, bound = constraint_ref(G, kind, name)
    expected = released_search(lambda gamma: lhs(gamma) <= bound, gamma_init, tol)
    assert gamma_of(name, G, kind, "authors", gamma_init, tol) == expected
    out = getattr(attacks, name)(G, 2, kind, search="authors", gamma_init=gamma_init, tol=tol)
    X = G.double()
    assert_close(out, (X.mean(0) + expected * perturbation_ref(X, kind)).expand(2, -1), torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", PERTURBATIONS)
@pytest.mark.parametrize("name", list(AGR_AGNOSTIC))
def test_agr_agnostic_rows_are_the_mean_pushed_by_gamma(name, kind, dtype):
    G = benign(dtype=dtype)
    X = G.double()
    out = getattr(attacks, name)(G, 3, kind)
    expected = X.mean(0) + gamma_of(name, G, kind) * perturbation_ref(X, kind)
    assert out.dtype == dtype
    assert torch.equal(out, expected.to(dtype).expand(3, -1))


def dyadic(G):
    """G rounded to multiples of 1/8, so that sums of a few rows, and so the mean, are exact."""
    return torch.round(G * 8) / 8


@pytest.mark.parametrize("search", ["exact", "authors"])
@pytest.mark.parametrize("kind", ["unit", "sign"])
@pytest.mark.parametrize("name", list(AGR_AGNOSTIC))
def test_identical_benign_rows_leave_no_room_and_give_the_mean(name, kind, search):
    row = dyadic(benign(1)[0])
    G = row.expand(5, -1).clone()
    assert gamma_of(name, G, kind, search) == 0.0
    assert torch.equal(getattr(attacks, name)(G, 2, kind, search=search), row.expand(2, -1))


@pytest.mark.parametrize("search", ["exact", "authors"])
@pytest.mark.parametrize("kind", ["unit", "sign"])
@pytest.mark.parametrize("name", list(AGR_AGNOSTIC))
def test_identical_rows_whose_rounded_mean_is_off_fail_at_gamma_zero_and_give_the_mean(name, kind, search):
    # The mean of 5 copies of a row is the row only up to rounding, while the bound is exactly 0: the
    # constraint fails at gamma = 0, the one way it can for finite rows (see min_max).
    G = benign(1)[0].expand(5, -1).clone()
    assert not torch.equal(G.mean(0), G[0])
    assert gamma_of(name, G, kind, search) == 0.0
    assert torch.equal(getattr(attacks, name)(G, 2, kind, search=search), G.mean(0).expand(2, -1))


def zero_mean():
    v = dyadic(benign(2))
    return torch.cat([v, -v])


ZERO_PERTURBATION = {   # kind -> benign rows that make p = 0
    "unit": zero_mean,
    "sign": zero_mean,
    "std": lambda: dyadic(benign(1)).expand(5, -1).clone(),
}


@pytest.mark.parametrize("search", ["exact", "authors"])
@pytest.mark.parametrize("kind", list(ZERO_PERTURBATION))
@pytest.mark.parametrize("name", list(AGR_AGNOSTIC))
def test_a_zero_perturbation_gives_the_mean(name, kind, search):
    # mu + gamma p = mu for every gamma, so nothing binds; exact reports gamma = 0 (the authors' search
    # climbs towards 2 gamma_init instead, to the same rows).
    G = ZERO_PERTURBATION[kind]()
    mu = G.mean(0)
    assert torch.equal(mu, torch.zeros_like(mu) if kind != "std" else G[0])
    assert torch.equal(getattr(attacks, name)(G, 2, kind, search=search), mu.expand(2, -1))
    if search == "exact":
        assert gamma_of(name, G, kind) == 0.0


@pytest.mark.parametrize("search", ["exact", "authors"])
@pytest.mark.parametrize("name", list(AGR_AGNOSTIC))
def test_non_finite_benign_rows_fail_at_gamma_zero_and_give_the_mean(name, search):
    # A NaN row makes the bound NaN, so no gamma fits, not even 0; the exact search must not step down forever.
    G = with_bad_rows(benign(), [(2, float("nan"))])
    assert gamma_of(name, G, "sign", search) == 0.0
    out = getattr(attacks, name)(G, 1, "sign", search=search)
    assert torch.equal(torch.isnan(out[0]), torch.isnan(G.mean(0)))


@pytest.mark.parametrize("name", list(AGR_AGNOSTIC))
def test_agr_agnostic_argument_errors(name):
    attack, G = getattr(attacks, name), benign()
    with pytest.raises(ValueError, match=rf"{name}: search='bisect' is not one of \('exact', 'authors'\)"):
        attack(G, 2, search="bisect")
    for bad in (0.0, -1.0, math.inf, math.nan):
        for arg in ("gamma_init", "tol"):
            with pytest.raises(ValueError, match=rf"{name}: {arg}={bad} is out of range; allowed > 0\.0"):
                attack(G, 2, search="authors", **{arg: bad})
    with pytest.raises(TypeError, match=rf"{name}: tol must be a real number, got '1e-5'"):
        attack(G, 2, tol="1e-5")
    with pytest.raises(TypeError, match="positional"):
        attack(G, 2, "unit", 10.0)


def test_min_max_unknown_perturbation_is_an_error():
    with pytest.raises(ValueError, match="perturbation='flip'"):
        attacks.min_max(benign(), 2, perturbation="flip")


def test_sign_flip_ipm_scaling_are_multiples_of_the_mean():
    G = benign()
    mu = G.mean(0)
    torch.testing.assert_close(attacks.sign_flip(G, 3, scale=2.0), (-2.0 * mu).expand(3, -1))
    torch.testing.assert_close(attacks.ipm(G, 3, eps=0.1), (-0.1 * mu).expand(3, -1))
    torch.testing.assert_close(attacks.scaling(G, 3, factor=100.0), (100.0 * mu).expand(3, -1))


def test_gaussian_and_noise_draw_from_the_generator():
    G = benign(d=4000)
    a = attacks.gaussian(G, 3, sigma=2.0, generator=torch.Generator().manual_seed(1))
    b = attacks.gaussian(G, 3, sigma=2.0, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert a.mean().abs() < 0.1 and 1.9 < a.std() < 2.1
    c = attacks.noise(G, 3, sigma=0.5, generator=torch.Generator().manual_seed(2))
    resid = c - G.mean(0)
    assert resid.mean().abs() < 0.05 and 0.45 < resid.std() < 0.55


@pytest.mark.parametrize("kind,check", [("nan", torch.isnan), ("inf", lambda x: x == math.inf),
                                        ("-inf", lambda x: x == -math.inf)])
def test_nan_inject_whole_rows(kind, check):
    out = attacks.nan_inject(benign(), 2, kind=kind)
    assert out.shape == (2, 64) and bool(check(out).all())


def test_nan_inject_single_entry_in_an_honest_looking_row():
    G = benign()
    out = attacks.nan_inject(G, 3, kind="entry", value=math.inf, generator=torch.Generator().manual_seed(0))
    bad = ~torch.isfinite(out)
    assert bad.sum(1).tolist() == [1, 1, 1]
    torch.testing.assert_close(out[~bad], G.mean(0).expand(3, -1)[~bad])


def test_attacks_keep_dtype_and_shape():
    G = benign(dtype=torch.float32)
    for name, attack in attacks.ATTACKS.items():
        out = attack(G, 4)
        assert out.shape == (4, 64) and out.dtype == torch.float32, name


def test_zero_attackers_give_an_empty_matrix():
    assert attacks.lie(benign(), 0).shape == (0, 64)


def test_negative_n_byz_is_an_error():
    with pytest.raises(ValueError, match="n_byz=-1"):
        attacks.scaling(benign(), -1)
