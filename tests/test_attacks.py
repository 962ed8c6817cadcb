"""Each attack against its formula (SPEC §6)."""
import math
from statistics import NormalDist

import pytest
import torch
from conftest import DEVICE

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


@pytest.mark.parametrize("perturbation", ["unit", "std", "sign"])
def test_min_max_stays_within_the_benign_spread_at_the_largest_gamma(perturbation):
    G = benign()
    out = attacks.min_max(G, 3, perturbation=perturbation)
    bound = torch.cdist(G, G).max()
    assert torch.cdist(out[:1], G).max() <= bound + 1e-9
    p = {"unit": -G.mean(0) / G.mean(0).norm(), "std": -G.std(0), "sign": -torch.sign(G.mean(0))}[perturbation]
    gamma = ((out[0] - G.mean(0)) @ p / (p @ p)).item()
    assert gamma > 0
    pushed = G.mean(0) + (gamma + 1e-3) * p   # a little further breaks the constraint
    assert torch.cdist(pushed[None], G).max() > bound


@pytest.mark.parametrize("perturbation", ["unit", "std", "sign"])
def test_min_sum_uses_squared_distances(perturbation):
    G = benign()
    out = attacks.min_sum(G, 2, perturbation=perturbation)
    D2 = torch.cdist(G, G) ** 2
    bound = D2.sum(1).max()
    assert (torch.cdist(out[:1], G) ** 2).sum() <= bound + 1e-9
    p = {"unit": -G.mean(0) / G.mean(0).norm(), "std": -G.std(0), "sign": -torch.sign(G.mean(0))}[perturbation]
    gamma = ((out[0] - G.mean(0)) @ p / (p @ p)).item()
    pushed = G.mean(0) + (gamma + 1e-3) * p
    assert (torch.cdist(pushed[None], G) ** 2).sum() > bound


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
