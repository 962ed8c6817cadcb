"""InvariantAggregator (robustagg/aggregators/invariant.py) against the sign-agreement mask times the
trimmed mean, written out in float64, with the authors' preset."""
import math

import pytest
import torch
from aggregator_formulas import X64, close, rand_G
from conftest import DEVICE

from robustagg import aggregators as A


# ---------------------------------------------------------------- float64 paper formulas

def invariant_ref(G, tau, lo, hi, strict=True):
    agreement = torch.sign(G).sum(0).abs() / G.shape[0]
    mask = agreement > tau if strict else agreement >= tau
    return torch.where(mask, G.sort(0).values[lo:hi].mean(0), torch.zeros(())), mask


# ---------------------------------------------------------------- random inputs vs the formulas

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
