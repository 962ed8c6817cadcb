"""order_mean, trimmed_mean, median, invariant (docs/ops.md) on every backend, against the
float64 reference."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import robustagg
from robustagg import NonFiniteUpdateError, ops, reference
from conftest import BAD, DEVICE, DTYPES, RESOLUTION, assert_close, backends_for, to_reference, with_bad_rows

NS = [1, 2, 3, 5, 20, 33, 64, 100, 257]
# 1, 7, primes, and the CPU tile (16 floats, 8 doubles) and task (64 tiles) sizes +-1
DS = [1, 7, 15, 16, 17, 101, 1023, 1025, 4099]
# row counts at the edges of the CPU kernel's paths: compiled networks for n <= 8, 16, 20, 24, 32,
# a network read from memory up to 2048 rows, per-coordinate selection beyond
PATH_NS = [8, 9, 16, 17, 20, 21, 32, 33, 2048, 2049]


def make_G(n, d, dtype=torch.float32, seed=0, device=DEVICE):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)


def median_ranks(n):
    return (n - 1) // 2, n // 2 + 1


def rank_windows(n):
    """(lo, hi) pairs: everything, the median, a symmetric trim, a one-sided window."""
    windows = {(0, n), median_ranks(n)}
    if n >= 3:
        windows.add((n // 4, n - n // 4))
        windows.add((0, max(1, n // 3)))
    return sorted(windows)


# ---------------------------------------------------------------- against the reference

@pytest.mark.parametrize("backend", backends_for("order_mean"))
@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("d", [1, 7, 17, 1025])
def test_order_mean_matches_reference(backend, n, d):
    G = make_G(n, d, seed=n * 7919 + d)
    for lo, hi in sorted(set(rank_windows(n)) | {(0, 1), (n - 1, n)}):  # and the minimum, the maximum alone
        out = ops.order_mean(G, lo, hi, backend=backend)
        assert out.shape == (d,) and out.dtype == G.dtype
        assert_close(out, reference.order_mean(to_reference(G), lo, hi), G.dtype)


@pytest.mark.parametrize("backend", backends_for("order_mean"))
@pytest.mark.parametrize("d", DS)
def test_order_mean_awkward_d(backend, d):
    G = make_G(20, d, seed=d)
    for lo, hi in rank_windows(20):
        assert_close(ops.order_mean(G, lo, hi, backend=backend), reference.order_mean(to_reference(G), lo, hi),
                     G.dtype)


@pytest.mark.parametrize("backend", backends_for("order_mean"))
@pytest.mark.parametrize("n", PATH_NS)
def test_order_mean_at_kernel_path_edges(backend, n):
    G = make_G(n, 19, seed=n)
    for lo, hi in rank_windows(n):
        assert_close(ops.order_mean(G, lo, hi, backend=backend), reference.order_mean(to_reference(G), lo, hi),
                     G.dtype)


@pytest.mark.parametrize("backend", backends_for("order_mean"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [3, 20, 64])
def test_order_mean_every_dtype(backend, dtype, n):
    G = make_G(n, 1031, dtype=dtype, seed=n)
    for lo, hi in rank_windows(n):
        out = ops.order_mean(G, lo, hi, backend=backend)
        assert out.dtype == dtype
        assert_close(out, reference.order_mean(to_reference(G), lo, hi), dtype)


@pytest.mark.parametrize("backend", backends_for("order_mean"))
@pytest.mark.parametrize("dtype", DTYPES)
def test_order_mean_every_dtype_beyond_256_rows(backend, dtype):
    # the GPU kernels sort up to 256 rows in one tile and select by radix beyond, per dtype
    G = make_G(300, 9, dtype=dtype, seed=300)
    out = ops.order_mean(G, 100, 240, backend=backend)
    assert out.dtype == dtype
    assert_close(out, reference.order_mean(to_reference(G), 100, 240), dtype)


@pytest.mark.parametrize("backend", backends_for("order_mean"))
@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6])
def test_order_mean_every_rank_window_small_n(backend, n):
    G = make_G(n, 33, seed=n)
    for lo in range(n):
        for hi in range(lo + 1, n + 1):
            assert_close(ops.order_mean(G, lo, hi, backend=backend), reference.order_mean(to_reference(G), lo, hi),
                         G.dtype)


@pytest.mark.parametrize("backend", backends_for("order_mean"))
@pytest.mark.parametrize("n", NS)
def test_trimmed_mean_matches_reference(backend, n):
    G = make_G(n, 301, seed=n)
    for trim in sorted({0, (n - 1) // 4, (n - 1) // 2}):
        assert_close(ops.trimmed_mean(G, trim, backend=backend), reference.trimmed_mean(to_reference(G), trim),
                     G.dtype)


@pytest.mark.parametrize("backend", backends_for("order_mean"))
@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 20, 21, 64, 100, 257])
def test_median_matches_numpy_for_even_and_odd_n(backend, n):
    G = make_G(n, 257, dtype=torch.float64, seed=n)
    out = ops.median(G, backend=backend)
    expected = torch.from_numpy(np.median(G.cpu().numpy(), axis=0))
    assert_close(out, expected, torch.float64)
    assert_close(out, reference.median(G.cpu()), torch.float64)


@pytest.mark.parametrize("backend", backends_for("order_mean"))
def test_median_of_even_n_averages_the_two_middle_values(backend):
    G = torch.tensor([[1.0], [10.0], [2.0], [4.0]], device=DEVICE)
    assert ops.median(G, backend=backend).item() == 3.0  # torch.median would give 2.0


@pytest.mark.parametrize("backend", backends_for("order_mean"))
@pytest.mark.parametrize("dtype", DTYPES)
def test_trim_zero_is_the_plain_mean_and_never_nan(backend, dtype):
    for n in [1, 2, 20]:
        G = make_G(n, 513, dtype=dtype, seed=n)
        out = ops.trimmed_mean(G, 0, backend=backend)
        assert not torch.isnan(out).any()
        assert_close(out, to_reference(G).mean(dim=0), dtype)


# ---------------------------------------------------------------- edge values

@pytest.mark.parametrize("backend", backends_for("order_mean"))
@pytest.mark.parametrize("n", [5, 20, 33, 100, 300])
def test_order_mean_exact_ties(backend, n):
    gen = torch.Generator().manual_seed(n)
    G = torch.randint(-2, 3, (n, 203), generator=gen).to(DEVICE, torch.float32)  # five distinct values
    for lo, hi in rank_windows(n):
        assert_close(ops.order_mean(G, lo, hi, backend=backend), reference.order_mean(to_reference(G), lo, hi),
                     G.dtype)


@pytest.mark.parametrize("backend", backends_for("order_mean"))
@pytest.mark.parametrize("n", [20, 300])
def test_order_mean_identical_rows_give_the_row(backend, n):
    # eighths, so that k copies add up exactly and the mean is the row itself, bit for bit
    row = (torch.randint(-800, 800, (1, 100), generator=torch.Generator().manual_seed(3)) / 8).to(DEVICE)
    G = row.expand(n, 100).contiguous()
    for lo, hi in rank_windows(n):
        assert torch.equal(ops.order_mean(G, lo, hi, backend=backend), row[0])


@pytest.mark.parametrize("backend", backends_for("order_mean"))
@pytest.mark.parametrize("n", [21, 300])
def test_order_mean_signed_zeros_give_zero(backend, n):
    G = torch.tensor([[0.0, -0.0, 0.0], [-0.0, -0.0, 0.0], [-0.0, 0.0, 0.0]], device=DEVICE).repeat(n // 3, 5)
    for lo, hi in rank_windows(G.shape[0]):
        out = ops.order_mean(G, lo, hi, backend=backend)
        assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("backend", backends_for("order_mean"))
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_order_mean_subnormals(backend, dtype):
    tiny = torch.finfo(dtype).tiny  # smallest normal; the values below are subnormal
    gen = torch.Generator().manual_seed(1)
    G = (torch.randint(-40, 41, (9, 77), generator=gen).double() * (tiny / 64)).to(DEVICE, dtype)
    assert (G.abs() < tiny).all() and (G != 0).any()
    for lo, hi in rank_windows(9):
        out = ops.order_mean(G, lo, hi, backend=backend)
        expected = reference.order_mean(to_reference(G), lo, hi)
        # the mean of subnormals is exact up to the final rounding to the grid of subnormals
        torch.testing.assert_close(out.cpu().double(), expected, atol=tiny / 64, rtol=0)


@pytest.mark.parametrize("backend", backends_for("order_mean"))
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_trimmed_huge_outliers_do_not_cost_honest_precision(backend, sign):
    n, trim, d = 20, 5, 257
    honest = 1e-3 * (1 + make_G(n - trim, d, seed=2).abs())
    huge = torch.full((trim, d), sign * 3e38, device=DEVICE)
    G = torch.cat([huge[:2], honest, huge[2:]])
    # the trim removes the outliers on one side and the extreme honest values on the other
    honest_sorted = torch.sort(honest.double(), dim=0).values
    kept = honest_sorted[trim:] if sign > 0 else honest_sorted[: n - 2 * trim]
    out = ops.trimmed_mean(G, trim, backend=backend)
    torch.testing.assert_close(out.double().cpu(), kept.mean(dim=0).cpu(), rtol=1e-5, atol=0)


@pytest.mark.parametrize("backend", backends_for("order_mean"))
@pytest.mark.parametrize("n", [7, 300])
def test_trimmed_huge_outliers_leave_equal_honest_values_exact(backend, n):
    G = torch.ones(n, 3, device=DEVICE)
    G[0] = 3e38
    G[1] = -3e38
    assert torch.equal(ops.trimmed_mean(G, 1, backend=backend).cpu(), torch.ones(3))


@pytest.mark.parametrize("backend", backends_for("order_mean"))
def test_median_ignores_outliers_on_both_sides(backend):
    G = make_G(21, 64, seed=5)
    G[0], G[1], G[2], G[3] = 3e38, -3e38, 3e38, -3e38
    honest = to_reference(G[4:])
    expected = torch.sort(honest, dim=0).values[8]
    torch.testing.assert_close(ops.median(G, backend=backend).double().cpu(), expected, rtol=0, atol=0)


# ---------------------------------------------------------------- non-finite rows (docs/nonfinite.md)

@pytest.mark.parametrize("backend", backends_for("order_mean"))
@pytest.mark.parametrize("dtype", DTYPES)
def test_nonfinite_rows_raise_with_original_indices(backend, dtype):
    G = with_bad_rows(make_G(9, 40, dtype=dtype), BAD)
    for call in [lambda: ops.median(G, backend=backend), lambda: ops.trimmed_mean(G, 1, backend=backend),
                 lambda: ops.order_mean(G, 2, 5, backend=backend)]:
        with pytest.raises(NonFiniteUpdateError) as info:
            call()
        assert info.value.clients == [1, 4, 6]


@pytest.mark.parametrize("backend", backends_for("order_mean"))
@pytest.mark.parametrize("dtype", DTYPES)
def test_nonfinite_rows_dropped_equal_the_op_on_finite_rows(backend, dtype):
    G = with_bad_rows(make_G(9, 40, dtype=dtype), BAD)
    finite = G[[0, 2, 3, 5, 7, 8]]
    median = ops.median(G, nonfinite="drop", backend=backend)
    assert torch.equal(median, ops.median(finite, backend=backend))
    assert_close(median, reference.median(to_reference(finite)), dtype)
    trimmed = ops.trimmed_mean(G, 2, nonfinite="drop", backend=backend)
    assert torch.equal(trimmed, ops.trimmed_mean(finite, 2, backend=backend))
    assert_close(trimmed, reference.trimmed_mean(to_reference(finite), 2), dtype)
    assert_close(ops.order_mean(G, 1, 4, nonfinite="drop", backend=backend),
                 reference.order_mean(to_reference(finite), 1, 4), dtype)


@pytest.mark.parametrize("backend", backends_for("order_mean"))
def test_drop_with_too_few_rows_left_names_the_counts(backend):
    G = with_bad_rows(make_G(5, 10), [(0, float("nan")), (3, float("inf"))])
    with pytest.raises(ValueError, match=r"n'=3.*n=5"):
        ops.trimmed_mean(G, 2, nonfinite="drop", backend=backend)
    with pytest.raises(ValueError, match=r"n'=3.*n=5"):
        ops.order_mean(G, 0, 4, nonfinite="drop", backend=backend)


@pytest.mark.parametrize("backend", backends_for("order_mean"))
def test_drop_with_every_row_nonfinite_raises(backend):
    G = torch.full((3, 8), float("nan"), device=DEVICE)
    with pytest.raises(ValueError, match="all n=3"):
        ops.median(G, nonfinite="drop", backend=backend)


@pytest.mark.parametrize("backend", backends_for("order_mean"))
def test_propagate_does_not_raise_and_keeps_clean_columns(backend):
    G = make_G(7, 50)
    G[2, 10] = float("nan")
    G[5, 20] = float("inf")
    clean = [j for j in range(50) if j not in (10, 20)]
    out = ops.median(G, nonfinite="propagate", backend=backend)
    assert_close(out[clean], reference.median(to_reference(G))[clean], G.dtype)
    out = ops.trimmed_mean(G, 1, nonfinite="propagate", backend=backend)
    assert_close(out[clean], reference.trimmed_mean(to_reference(G), 1)[clean], G.dtype)


@pytest.mark.parametrize("backend", backends_for("order_mean"))
@pytest.mark.parametrize("n", [40, 300])
def test_nonfinite_flags_come_from_the_same_call(backend, n):
    G = with_bad_rows(make_G(n, 1000), [(3, float("nan")), (n - 1, float("-inf"))])
    G[17, 999] = float("inf")  # in the last, partial tile of a row
    fn = robustagg._backend.raw_op("order_mean", backend)
    _, bad = fn(G, 10, 30)
    assert bad.tolist() == [i in (3, 17, n - 1) for i in range(n)]


# ---------------------------------------------------------------- layout, determinism

@pytest.mark.parametrize("backend", backends_for("order_mean"))
def test_order_mean_non_contiguous_input(backend):
    base = make_G(33, 402, seed=9)
    for G in [base[:, ::2], make_G(150, 20, seed=4).t(), base[1::3, 5:300]]:
        assert not G.is_contiguous()
        for lo, hi in rank_windows(G.shape[0]):
            assert_close(ops.order_mean(G, lo, hi, backend=backend), reference.order_mean(to_reference(G), lo, hi),
                         G.dtype)


@pytest.mark.parametrize("backend", backends_for("order_mean"))
@pytest.mark.parametrize("n", [20, 100, 2100])
def test_order_mean_is_deterministic(backend, n):
    G = make_G(n, 40_000 if n <= 100 else 300, seed=n)
    lo, hi = median_ranks(n)
    first = ops.order_mean(G, lo, hi, backend=backend)
    second = ops.order_mean(G, lo, hi, backend=backend)
    assert torch.equal(first, second)


# ---------------------------------------------------------------- invariant

@pytest.mark.parametrize("backend", backends_for("invariant"))
@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("strict", [True, False])
def test_invariant_matches_reference(backend, n, strict):
    G = make_G(n, 523, seed=n) + 0.3  # a bias, so that some coordinates pass the vote
    trim = (n - 1) // 4
    for tau in [0.0, 0.2, 0.6, 1.0]:
        out, mask = ops.invariant(G, tau, trim, strict, return_mask=True, backend=backend)
        ref_out, ref_mask = reference.invariant(to_reference(G), tau, trim, strict, return_mask=True)
        assert torch.equal(mask.cpu(), ref_mask)
        assert_close(out, ref_out, G.dtype)


@pytest.mark.parametrize("backend", backends_for("invariant"))
@pytest.mark.parametrize("dtype", DTYPES)
def test_invariant_every_dtype(backend, dtype):
    G = make_G(20, 1031, dtype=dtype, seed=2) + 0.5
    out, mask = ops.invariant(G, 0.6, 5, return_mask=True, backend=backend)
    ref_out, ref_mask = reference.invariant(to_reference(G), 0.6, 5, return_mask=True)
    assert out.dtype == dtype and mask.dtype == torch.bool
    assert torch.equal(mask.cpu(), ref_mask)
    assert_close(out, ref_out, dtype)


@pytest.mark.parametrize("backend", backends_for("invariant"))
def test_invariant_tau_exactly_at_the_agreement(backend):
    # 10 clients, column j has 4 + j positive votes (agreement 0.6 at j = 4 after 2 negatives)
    n = 10
    G = -torch.ones(n, 7, device=DEVICE)
    for j in range(7):
        G[: 4 + j, j] = 1.0
    agreement = (reference.sign_sum(G.cpu()).abs().double() / n)
    for strict in (True, False):
        _, mask = ops.invariant(G, 0.6, 2, strict, return_mask=True, backend=backend)
        expected = agreement > 0.6 if strict else agreement >= 0.6
        assert torch.equal(mask.cpu(), expected), (strict, agreement)


@pytest.mark.parametrize("backend", backends_for("invariant"))
def test_invariant_masked_coordinates_are_zero(backend):
    G = make_G(20, 300, seed=8)
    out, mask = ops.invariant(G, 1.0, 5, strict=False, return_mask=True, backend=backend)
    assert (out[~mask] == 0).all()


@pytest.mark.parametrize("backend", backends_for("invariant"))
@pytest.mark.parametrize("n", [10, 20, 33, 100])
def test_invariant_ranks_official_preset(backend, n):
    # the authors' released code keeps ranks int(0.45n)..int(0.55n)-1, tau = 0.6 with >=
    G = make_G(n, 517, seed=n) + 0.4
    lo, hi = int(0.45 * n), max(int(0.55 * n), int(0.45 * n) + 1)
    out, mask = ops.invariant_ranks(G, 0.6, lo, hi, strict=False, return_mask=True, backend=backend)
    G64 = to_reference(G)
    ref_mask = reference.sign_sum(G64).abs().double() / n >= 0.6
    assert torch.equal(mask.cpu(), ref_mask)
    assert_close(out, torch.where(ref_mask, reference.order_mean(G64, lo, hi), 0.0), G.dtype)


@pytest.mark.parametrize("backend", backends_for("invariant"))
def test_invariant_nonfinite_policies(backend):
    G = with_bad_rows(make_G(9, 64) + 0.5, BAD)
    with pytest.raises(NonFiniteUpdateError) as info:
        ops.invariant(G, 0.6, 1, backend=backend)
    assert info.value.clients == [1, 4, 6]
    finite = G[[0, 2, 3, 5, 7, 8]]
    dropped = ops.invariant(G, 0.6, 1, nonfinite="drop", backend=backend)
    assert torch.equal(dropped, ops.invariant(finite, 0.6, 1, backend=backend))
    assert_close(dropped, reference.invariant(to_reference(finite), 0.6, 1), G.dtype)
    with pytest.raises(ValueError, match=r"n'=6.*n=9"):
        ops.invariant(G, 0.6, 3, nonfinite="drop", backend=backend)
    clean = [j for j in range(64) if j not in (1, 4, 6)]
    out = ops.invariant(G, 0.6, 1, nonfinite="propagate", backend=backend)
    assert_close(out[clean], reference.invariant(to_reference(G), 0.6, 1)[clean], G.dtype)


@pytest.mark.parametrize("backend", backends_for("invariant"))
def test_invariant_non_contiguous_and_deterministic(backend):
    G = (make_G(20, 20_000, seed=3) + 0.3)[:, ::2]
    first = ops.invariant(G, 0.2, 5, backend=backend)
    assert_close(first, reference.invariant(to_reference(G), 0.2, 5), G.dtype)
    assert torch.equal(first, ops.invariant(G, 0.2, 5, backend=backend))


# ---------------------------------------------------------------- properties, opcheck

@st.composite
def order_problems(draw):
    n = draw(st.integers(1, 40))
    d = draw(st.integers(1, 40))
    lo = draw(st.integers(0, n - 1))
    hi = draw(st.integers(lo + 1, n))
    values = draw(st.lists(st.floats(-2.0 ** 100, 2.0 ** 100, width=32), min_size=n * d, max_size=n * d))
    return torch.tensor(values, dtype=torch.float32).reshape(n, d), lo, hi


@pytest.mark.parametrize("backend", backends_for("order_mean"))
@settings(max_examples=60, deadline=None)
@given(problem=order_problems())
def test_order_mean_property_matches_reference(backend, problem):
    G, lo, hi = problem
    G = G.to(DEVICE)
    expected = reference.order_mean(to_reference(G), lo, hi)
    out = ops.order_mean(G, lo, hi, backend=backend)
    # recursive float32 summation of k = hi-lo values: |error| <= k * 2^-24 * max|kept| (incl. the division)
    kept_max = torch.sort(to_reference(G), dim=0).values[lo:hi].abs().amax(dim=0)
    error = (out.double().cpu() - expected).abs()
    assert (error <= kept_max * (hi - lo) * 2.0 ** -23 + 1e-44).all()


@pytest.mark.parametrize("backend", backends_for("invariant"))
@settings(max_examples=40, deadline=None)
@given(problem=order_problems(), tau=st.floats(0, 1))
def test_invariant_property_matches_reference(backend, problem, tau):
    G, _, _ = problem
    G = G.to(DEVICE)
    trim = (G.shape[0] - 1) // 2
    out, mask = ops.invariant(G, tau, trim, return_mask=True, backend=backend)
    ref_out, ref_mask = reference.invariant(to_reference(G), tau, trim, return_mask=True)
    assert torch.equal(mask.cpu(), ref_mask)
    bound = to_reference(G).abs().amax(dim=0) * G.shape[0] * 2.0 ** -23 + 1e-44
    assert ((out.double().cpu() - ref_out).abs() <= bound).all()


@pytest.mark.skipif(DEVICE.type != "cpu", reason="opcheck of the CPU registrations")
@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck_order_mean_and_invariant(dtype):
    G = make_G(20, 37, dtype=dtype)
    torch.library.opcheck(torch.ops.robustagg.order_mean.default, (G, 5, 15))
    torch.library.opcheck(torch.ops.robustagg.order_mean.default, (make_G(1, 5, dtype=dtype), 0, 1))
    torch.library.opcheck(torch.ops.robustagg.invariant.default, (G, 9, 11, 12))
