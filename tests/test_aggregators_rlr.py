"""RobustLR (robustagg/aggregators/rlr.py) against the paper's learning-rate sign times the base rule,
written out in float64, plus a hand-checkable case."""
import numpy as np
import pytest
import torch
from aggregator_formulas import T, X64, clipped, close, fedavg_ref, median_norm_step_ref, rand_G

from robustagg import aggregators as A


# ---------------------------------------------------------------- float64 paper formulas

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


# ---------------------------------------------------------------- random inputs vs the formulas

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
    # the documented draw: one seed s from the aggregator's generator, then N(0, 1) from seed s + 0
    # (d = 400 is one chunk)
    s = int(torch.randint(0, 2 ** 62, (1,), generator=torch.Generator().manual_seed(1)))
    z = torch.randn(400, generator=torch.Generator().manual_seed(s), dtype=torch.float64) * (0.5 * 2.0)
    votes = torch.sign(X64(G)).sum(0)
    lr = torch.where(votes.abs() >= 8, 1.0, -1.0)
    close(out, lr * (fedavg_ref(clipped(X64(G), 2.0)) + z))
    assert agg.last_report.lr_positive_fraction == pytest.approx((votes.abs() >= 8).double().mean().item())


# ---------------------------------------------------------------- hand-checkable cases

def test_hand_robust_lr_flips_the_contested_coordinate():
    # votes: coordinate 0 has 3 agreeing signs, coordinate 1 only |1 - 2| = 1 < theta = 2
    out = A.RobustLR(theta=2)(T([[1.0, 3.0], [2.0, -1.0], [3.0, -2.0]]))
    assert out.tolist() == [2.0, 0.0]
    out = A.RobustLR(theta=2)(T([[1.0, 3.0], [2.0, -1.0], [3.0, -5.0]]))
    assert out.tolist() == [2.0, 1.0]
