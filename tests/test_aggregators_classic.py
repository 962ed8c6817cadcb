"""The classic rules of robustagg/aggregators/classic.py (FedAvg, CoordinateMedian, TrimmedMean,
SignSGD, NormClipping, GeometricMedian, CenteredClipping) against plainly written float64 versions
of their formulas, plus small hand-checkable cases."""
import math

import numpy as np
import pytest
import torch
from aggregator_formulas import (T, X64, centered_clipping_ref, clipped, close, fedavg_ref, geomed_ref,
                                 median_norm_step_ref, rand_G, trimmed_ref)
from conftest import DEVICE

from robustagg import aggregators as A


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


# ---------------------------------------------------------------- hand-checkable cases

def test_hand_fedavg_weighted():
    assert A.FedAvg()(T([[1.0, 2.0], [3.0, 4.0]]), weights=[1.0, 3.0]).tolist() == [2.5, 3.5]


def test_hand_median_even_n_averages_the_middle_two():
    assert A.CoordinateMedian()(T([[1.0], [5.0], [2.0], [10.0]])).tolist() == [3.5]


def test_hand_trimmed_mean_drops_the_outlier():
    assert A.TrimmedMean(trim=1)(T([[1.0], [2.0], [3.0], [100.0]])).tolist() == [2.5]


def test_hand_signsgd():
    assert A.SignSGD(server_lr=1.0)(T([[1.0, -1.0], [2.0, -3.0], [-1.0, 0.0]])).tolist() == [1.0, -1.0]
    # norms 2, 4, 600, 5 (lower median 4) over sqrt(d) = 2: steps of 2; the huge client only votes
    G = T([[1.0, 1.0, 1.0, 1.0], [2.0, 2.0, 2.0, -2.0], [300.0, 300.0, 300.0, -300.0], [0.0, 3.0, 4.0, 0.0]])
    assert A.SignSGD()(G).tolist() == [2.0, 2.0, 2.0, -2.0]
