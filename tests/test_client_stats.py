"""client_stats and clip_rows (docs/ops.md) against robustagg.reference on every backend."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from conftest import DEVICE, DTYPES, assert_close, backends_for, to_reference
import robustagg
from robustagg import NonFiniteUpdateError, ops, reference

NS = [1, 2, 3, 5, 20, 33, 64, 100, 257]
DS = [1, 7, 4095, 4096, 4097, 1009]


def _G(n, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g).to(dtype).to(DEVICE)


def _check_stats(stats, G, window, ref):
    expected = reference.client_stats(to_reference(G), window, None if ref is None else to_reference(ref))
    assert_close(stats.norm, expected.norm, G.dtype)
    # counts over the window divided in float64: exact up to the final rounding
    torch.testing.assert_close(stats.sign_frac.double().cpu(), expected.sign_frac, atol=1e-7, rtol=0)
    if ref is None:
        assert stats.dot is None and stats.ref_norm is None and stats.ref_dist is None and stats.cosine is None
    else:
        scale = float(to_reference(G).abs().sum(1).max() * to_reference(ref).abs().max())
        assert_close(stats.dot, expected.dot, G.dtype, scale=max(scale, 1.0))
        assert_close(stats.ref_norm, expected.ref_norm, G.dtype)
        assert_close(stats.ref_dist, expected.ref_dist, G.dtype)
        assert_close(stats.cosine, reference.cosine_to(to_reference(G), to_reference(ref)), G.dtype)
    # float64 for every dtype: the norm of a float32 row of 3e38 fits only there
    assert all(t.dtype == torch.float64 for t in (stats.norm, stats.sign_frac) + (
        () if ref is None else (stats.dot, stats.ref_norm, stats.ref_dist, stats.cosine)))


# ---------------------------------------------------------------- client_stats

@pytest.mark.parametrize("backend", backends_for("client_stats"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", NS)
def test_client_stats_matches_reference(backend, dtype, n):
    d = DS[n % len(DS)]
    G = _G(n, d, dtype, seed=n)
    ref = _G(1, d, dtype, seed=n + 1)[0]
    window = (d // 3, max(1, d // 10))
    _check_stats(ops.client_stats(G, window, ref, backend=backend), G, window, ref)


@pytest.mark.parametrize("backend", backends_for("client_stats"))
@pytest.mark.parametrize("d", DS)
def test_client_stats_awkward_widths(backend, d):
    G = _G(5, d, torch.float32, seed=d)
    _check_stats(ops.client_stats(G, backend=backend), G, None, None)


@pytest.mark.parametrize("backend", backends_for("client_stats"))
@pytest.mark.parametrize("window", [None, (0, 1), (4096, 1), (4099, 2), (0, 4101), (1, 4100)], ids=str)
def test_client_stats_window_edges(backend, window):
    G = _G(3, 4101, torch.float32)
    ref = _G(1, 4101, torch.float32, seed=9)[0]
    _check_stats(ops.client_stats(G, window, ref, backend=backend), G, window, ref)


@pytest.mark.parametrize("backend", backends_for("client_stats"))
def test_client_stats_signed_zeros_and_subnormals(backend):
    tiny = torch.finfo(torch.float32).tiny / 8  # subnormal
    row = torch.tensor([0.0, -0.0, tiny, -tiny, 1.0, -0.0, 0.0], dtype=torch.float32)
    stats = ops.client_stats(row[None].to(DEVICE), backend=backend)
    assert stats.sign_frac.cpu().tolist() == [[pytest.approx(2 / 7), pytest.approx(4 / 7), pytest.approx(1 / 7)]]
    assert stats.norm.item() == pytest.approx(1.0)


@pytest.mark.parametrize("backend", backends_for("client_stats"))
def test_client_stats_huge_values_do_not_overflow(backend):
    G = _G(4, 4097, torch.float32)
    G[1, 7] = 3e38
    G[2, 100] = -3e38
    G[3] = 1e30  # every square overflows float32, and so does their sum
    stats = ops.client_stats(G, backend=backend)
    assert torch.isfinite(stats.norm).all()
    assert stats.norm[1].item() == pytest.approx(3e38, rel=1e-6)
    assert stats.norm[3].item() == pytest.approx(1e30 * 4097 ** 0.5, rel=1e-6)
    assert stats.finite.all()
    _check_stats(stats, G, None, None)


@pytest.mark.parametrize("backend", backends_for("client_stats"))
def test_client_stats_float64_huge_values_are_finite_rows(backend):
    G = _G(2, 33, torch.float64)
    G[0, 3] = 1e200  # squares to Inf in float64, but the row is finite
    stats = ops.client_stats(G, nonfinite="propagate", backend=backend)
    assert stats.finite.all()


@pytest.mark.parametrize("backend", backends_for("client_stats"))
def test_client_stats_ref_dist_comes_from_differences(backend):
    # ||G_i||^2 + ||ref||^2 - 2 G_i . ref would cancel to 0 (or below) for these nearly equal rows
    ref = torch.full((64,), 1e8, dtype=torch.float64)
    G = ref.repeat(2, 1)
    G[0, 3] += 1.0
    stats = ops.client_stats(G.to(DEVICE), ref=ref.to(DEVICE), backend=backend)
    assert stats.ref_dist.cpu().tolist() == [1.0, 0.0]


# float64 rows whose squares or products overflow (1e200) or underflow (1e-200, the smallest
# subnormal 5e-324), each with a reference vector of its kind (docs/nonfinite.md, "kScaled" sums).
EXTREME_FLOAT64_ROWS = {
    "huge": ([[1e200, 1e200, -1e200], [1e200] * 3, [-3e200, 0.0, 1e-300]], [1e108] * 3),
    "tiny": ([[1e-200] * 3, [5e-324] * 3, [0.0] * 3, [1e-200, -1e-200, 5e-324]], [2e-200, 1e-200, 0.0]),
    "cancelling": ([[1e200, 1e200], [1e200, -1e200]], [1e200, -1e200]),
}


@pytest.mark.parametrize("backend", backends_for("client_stats"))
@pytest.mark.parametrize("case", sorted(EXTREME_FLOAT64_ROWS))
def test_client_stats_float64_huge_and_tiny_rows_match_reference(backend, case):
    rows, ref_values = EXTREME_FLOAT64_ROWS[case]
    G = torch.tensor(rows, dtype=torch.float64)
    ref = torch.tensor(ref_values, dtype=torch.float64)
    raw = robustagg._backend.raw_op("client_stats", backend)
    norm, _, dot, ref_norm, ref_dist, flags = raw(G.to(DEVICE), 0, G.shape[1], ref.to(DEVICE))
    expected = reference.client_stats(G, None, ref)
    exact = dict(rtol=1e-12, atol=0.0)
    torch.testing.assert_close(norm.cpu(), expected.norm, **exact)
    torch.testing.assert_close(ref_dist.cpu(), expected.ref_dist, **exact)
    torch.testing.assert_close(ref_norm.cpu(), expected.ref_norm.reshape(1), **exact)
    torch.testing.assert_close(dot.cpu(), expected.dot, **exact)  # 1e308, and +-Inf where G_i . ref overflows
    assert torch.isfinite(norm).all() and torch.isfinite(ref_dist).all() and not flags.any()
    assert (norm[expected.norm.to(DEVICE) > 0] > 0).all()


@pytest.mark.parametrize("backend", backends_for("client_stats"))
def test_client_stats_float64_cancelling_dot_is_exact_where_the_plain_sum_is_nan(backend):
    # 1e200 * 1e200 - 1e200 * 1e200 is Inf - Inf in float64; scaled by 2^-600 it is exactly 0
    G = torch.tensor([[1e200, 1e200]], dtype=torch.float64, device=DEVICE)
    ref = torch.tensor([1e200, -1e200], dtype=torch.float64, device=DEVICE)
    assert ops.client_stats(G, ref=ref, backend=backend).dot.cpu().tolist() == [0.0]


@pytest.mark.parametrize("backend", backends_for("client_stats"))
def test_client_stats_zero_rows(backend):
    G = torch.zeros(3, 17, device=DEVICE)
    ref = _G(1, 17, torch.float32)[0]
    stats = ops.client_stats(G, None, ref, backend=backend)
    assert (stats.norm == 0).all() and (stats.dot == 0).all()
    assert (stats.cosine == 0).all()
    assert (stats.sign_frac[:, 1] == 1).all()


@pytest.mark.parametrize("backend", backends_for("client_stats"))
@pytest.mark.parametrize("bad_value", [float("nan"), float("inf"), float("-inf")])
def test_client_stats_nonfinite_raise(backend, bad_value):
    G = _G(5, 33, torch.float32)
    G[1, 4] = bad_value
    G[3, 0] = bad_value
    with pytest.raises(NonFiniteUpdateError) as info:
        ops.client_stats(G, backend=backend)
    assert info.value.clients == [1, 3]


@pytest.mark.parametrize("backend", backends_for("client_stats"))
def test_client_stats_nonfinite_drop(backend):
    G = _G(5, 33, torch.float32)
    ref = _G(1, 33, torch.float32, seed=3)[0]
    G[2, 30] = float("nan")
    stats = ops.client_stats(G, (1, 20), ref, nonfinite="drop", backend=backend)
    assert stats.finite.tolist() == [True, True, False, True, True]
    assert torch.isnan(stats.norm[2]) and torch.isnan(stats.sign_frac[2]).all() and torch.isnan(stats.dot[2])
    keep = torch.tensor([0, 1, 3, 4])
    expected = reference.client_stats(to_reference(G[keep]), (1, 20), to_reference(ref))
    assert_close(stats.norm[keep], expected.norm, torch.float32)
    assert_close(stats.dot[keep], expected.dot, torch.float32, scale=100)


@pytest.mark.parametrize("backend", backends_for("client_stats"))
def test_client_stats_nonfinite_propagate_reports_finite(backend):
    G = _G(3, 9, torch.float32)
    G[0, 8] = float("inf")
    stats = ops.client_stats(G, nonfinite="propagate", backend=backend)
    assert stats.finite.tolist() == [False, True, True]
    assert torch.isinf(stats.norm[0])


@pytest.mark.parametrize("backend", backends_for("client_stats"))
def test_client_stats_non_contiguous(backend):
    base = _G(8, 200, torch.float32)
    G = base[::2, ::3]
    assert not G.is_contiguous()
    _check_stats(ops.client_stats(G, (5, 30), backend=backend), G.contiguous(), (5, 30), None)


@pytest.mark.parametrize("backend", backends_for("client_stats"))
def test_client_stats_deterministic(backend):
    G = _G(20, 70001, torch.float32)
    ref = _G(1, 70001, torch.float32, seed=2)[0]
    a, b = ops.client_stats(G, (5, 7000), ref, backend=backend), ops.client_stats(G, (5, 7000), ref, backend=backend)
    for x, y in [(a.norm, b.norm), (a.sign_frac, b.sign_frac), (a.dot, b.dot), (a.ref_norm, b.ref_norm)]:
        assert torch.equal(x, y)


@pytest.mark.parametrize("backend", backends_for("client_stats"))
def test_client_stats_identical_rows_identical_stats(backend):
    G = _G(4, 1000, torch.float32)
    G[3] = G[1]
    stats = ops.client_stats(G, (0, 100), G[0].clone(), backend=backend)
    assert stats.norm[3] == stats.norm[1] and stats.dot[3] == stats.dot[1]


def test_client_stats_bad_window():
    with pytest.raises(ValueError, match="window length"):
        ops.client_stats(torch.ones(2, 5), (3, 3))
    with pytest.raises(ValueError, match="window start"):
        ops.client_stats(torch.ones(2, 5), (5, 1))


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 9), d=st.integers(1, 300), data=st.data())
def test_client_stats_property(n, d, data):
    values = st.sampled_from([0.0, -0.0, 1.0, -1.0, 2.5, -3e-3, 1e-40, 7.0])
    G = torch.tensor(data.draw(st.lists(values, min_size=n * d, max_size=n * d)), dtype=torch.float32).reshape(n, d)
    start = data.draw(st.integers(0, d - 1))
    length = data.draw(st.integers(1, d - start))
    ref = torch.linspace(-1, 1, d)
    for backend in ("cpu", "torch"):
        _check_stats(ops.client_stats(G, (start, length), ref, backend=backend), G, (start, length), ref)


# ---------------------------------------------------------------- clip_rows

def _check_clip(out, G, max_norm):
    expected = reference.clip_rows(to_reference(G), torch.as_tensor(max_norm, dtype=torch.float64))
    assert_close(out, expected, G.dtype)
    assert out.dtype == G.dtype and out.shape == G.shape


@pytest.mark.parametrize("backend", backends_for("clip_rows"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", NS)
def test_clip_rows_scalar_matches_reference(backend, dtype, n):
    d = DS[n % len(DS)]
    G = _G(n, d, dtype, seed=n)
    bound = float(to_reference(G).norm(dim=1).median())
    _check_clip(ops.clip_rows(G, bound, backend=backend), G, bound)


@pytest.mark.parametrize("backend", backends_for("clip_rows"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_clip_rows_per_row_bound(backend, dtype):
    G = _G(6, 1009, dtype)
    G[4] = 0
    bound = torch.tensor([0.0, 1.0, 10.0, 100.0, 31.0, 32.0])
    out = ops.clip_rows(G, bound, backend=backend)
    _check_clip(out, G, bound)
    assert torch.equal(out[4].cpu(), torch.zeros(1009, dtype=dtype))


@pytest.mark.parametrize("backend", backends_for("clip_rows"))
def test_clip_rows_zero_row_stays_zero(backend):
    G = _G(3, 50, torch.float32)
    G[1] = 0
    out = ops.clip_rows(G, 0.5, backend=backend)
    assert (out[1] == 0).all() and not torch.isnan(out).any()
    out = ops.clip_rows(G, 0.0, backend=backend)
    assert (out == 0).all()


@pytest.mark.parametrize("backend", backends_for("clip_rows"))
def test_clip_rows_short_rows_unchanged(backend):
    G = _G(4, 300, torch.float32)
    out = ops.clip_rows(G, 1e6, backend=backend)
    assert torch.equal(out, G)


@pytest.mark.parametrize("backend", backends_for("clip_rows"))
def test_clip_rows_huge_values(backend):
    G = _G(2, 40, torch.float32)
    G[0, 3] = 3e38
    out = ops.clip_rows(G, 1.0, backend=backend)
    assert torch.isfinite(out).all()
    assert to_reference(out[0]).norm().item() == pytest.approx(1.0, rel=1e-5)
    _check_clip(out, G, 1.0)


@pytest.mark.parametrize("backend", backends_for("clip_rows"))
def test_clip_rows_float64_huge_and_tiny_rows(backend):
    G = torch.tensor([[1e200] * 4, [1e-200] * 4, [5e-324] * 4, [0.0] * 4, [3.0, 4.0, 0.0, 0.0], [1e-200] * 4],
                     dtype=torch.float64)
    bound = torch.tensor([1.0, 1e-201, 5e-324, 1.0, 2.5, 1.0], dtype=torch.float64)
    out = ops.clip_rows(G.to(DEVICE), bound.to(DEVICE), backend=backend).cpu()
    torch.testing.assert_close(out, reference.clip_rows(G, bound), rtol=1e-12, atol=0.0)
    assert out[0].tolist() == [0.5] * 4 and out[1].tolist() == [5e-202] * 4
    assert torch.equal(out[5], G[5])  # ||G_5|| = 2e-200 <= 1: kept exactly


@pytest.mark.parametrize("backend", backends_for("clip_rows"))
def test_clip_rows_factor_below_the_float32_range_keeps_its_precision(backend):
    # max_norm / ||G_0|| = 1e-3 / 6e38 is a float32 subnormal: rounded to float32 it would lose
    # ~3e-4 relative; in float64 the result is the correctly rounded float32
    G = torch.full((2, 4), 3e38, device=DEVICE)
    bound = torch.tensor([1e-3, torch.finfo(torch.float32).max])
    out = ops.clip_rows(G, bound, backend=backend)
    assert torch.equal(out.cpu(), reference.clip_rows(G.cpu(), bound))
    assert_close(out[0], torch.full((4,), 5e-4, dtype=torch.float64), torch.float32)


@pytest.mark.parametrize("backend", backends_for("clip_rows"))
def test_clip_rows_nonfinite_policies(backend):
    G = _G(4, 20, torch.float32)
    G[2, 5] = float("nan")
    with pytest.raises(NonFiniteUpdateError) as info:
        ops.clip_rows(G, 1.0, backend=backend)
    assert info.value.clients == [2]
    out = ops.clip_rows(G, 1.0, nonfinite="drop", backend=backend)
    assert torch.isnan(out[2]).all()
    keep = torch.tensor([0, 1, 3])
    _check_clip(out[keep], G[keep], 1.0)


@pytest.mark.parametrize("backend", backends_for("clip_rows"))
def test_clip_rows_non_contiguous_and_deterministic(backend):
    G = _G(6, 90, torch.float32).T.contiguous().T[:, ::2]
    assert not G.is_contiguous()
    out = ops.clip_rows(G, 2.0, backend=backend)
    _check_clip(out, G.contiguous(), 2.0)
    assert torch.equal(out, ops.clip_rows(G, 2.0, backend=backend))


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 6), d=st.integers(1, 200), bound=st.floats(0, 50), seed=st.integers(0, 1000))
def test_clip_rows_property(n, d, bound, seed):
    G = _G(n, d, torch.float32, seed) * (seed % 7)
    for backend in ("cpu", "torch"):
        _check_clip(ops.clip_rows(G, bound, backend=backend), G, bound)


# ---------------------------------------------------------------- opcheck

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_opcheck_client_stats(dtype):
    G = _G(5, 37, dtype)
    ref = _G(1, 37, dtype, seed=1)[0]
    torch.library.opcheck(torch.ops.robustagg.client_stats.default, (G, 3, 10, ref))
    torch.library.opcheck(torch.ops.robustagg.client_stats.default, (G, 0, 37, None))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_opcheck_clip_rows(dtype):
    G = _G(5, 37, dtype)
    bound = torch.full((5,), 2.0, dtype=reference.acc_dtype(dtype))
    torch.library.opcheck(torch.ops.robustagg.clip_rows.default, (G, bound))


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_client_stats_rejects_nonfinite_ref(bad_value, dtype):
    ref = torch.zeros(9, dtype=dtype)
    ref[4] = bad_value
    with pytest.raises(ValueError, match="ref holds NaN or Inf"):
        ops.client_stats(torch.ones(2, 9, dtype=dtype), ref=ref)


@pytest.mark.skipif(robustagg.available_backends()["cpu"] != "available", reason="the cpu backend is not built")
def test_cpu_results_independent_of_thread_count():
    """The C++ kernels cut work by d only, so OMP thread counts cannot change a bit."""
    G = _G(9, 300_001, torch.float32)
    ref = _G(1, 300_001, torch.float32, seed=5)[0]
    before = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            stats = ops.client_stats(G, (5, 30_000), ref, backend="cpu")
            outs.append((stats.norm, stats.dot, stats.ref_norm, ops.clip_rows(G, 1.0, backend="cpu")))
    finally:
        torch.set_num_threads(before)
    for other in outs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(outs[0], other))
