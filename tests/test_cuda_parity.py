"""Bitwise agreement of the CUDA C++ backend with the C++ CPU backend (docs/backends.md, issue 5).

The coordinate-wise ops share their per-coordinate math (csrc/core) and accumulation order, and
both builds disable floating-point contraction, so float32 results must be identical bit for bit,
not merely close, including the redo of sums of huge finite values that overflow (docs/nonfinite.md). Top-k
selections are deterministic by construction (ties to the lower index) and must pick the same
coordinates. client_stats and the pairwise matrices are float64 for every input dtype and agree
within float64 rounding (their summation orders differ). Needs a CUDA device and both compiled
backends; skipped with the reason otherwise.
"""
from __future__ import annotations

import pytest
import torch

import robustagg
import robustagg.layout
from robustagg import ops

_AVAILABLE = robustagg.available_backends()
pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: CPU/CUDA parity needs a GPU"),
    pytest.mark.skipif(_AVAILABLE["cuda"] != "available", reason=f"cuda backend: {_AVAILABLE['cuda']}"),
    pytest.mark.skipif(_AVAILABLE["cpu"] != "available", reason=f"cpu backend: {_AVAILABLE['cpu']}"),
]

NS = [1, 2, 3, 5, 20, 33, 64, 65, 100, 257, 513]
DS = [1, 7, 127, 129, 1000, 4099]


def awkward(n: int, d: int, seed: int) -> torch.Tensor:
    """float32 (n, d) with exact ties, both zeros, subnormals and +-3e38 outliers."""
    g = torch.Generator().manual_seed(seed)
    G = torch.randn(n, d, generator=g)
    pick = torch.rand(n, d, generator=g)
    G = torch.where(pick < 0.15, G.round(), G)                        # exact ties
    G = torch.where((pick >= 0.15) & (pick < 0.2), torch.zeros(()), G)
    G = torch.where((pick >= 0.2) & (pick < 0.25), torch.full((), -0.0), G)
    G = torch.where((pick >= 0.25) & (pick < 0.27), torch.full((), 1e-40), G)   # subnormal
    G = torch.where((pick >= 0.27) & (pick < 0.28), torch.full((), -3e38), G)
    G = torch.where((pick >= 0.28) & (pick < 0.29), torch.full((), 3e38), G)
    return G


_BITS = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32,
         torch.float64: torch.int64}


def assert_bitwise(cuda_out: torch.Tensor, cpu_out: torch.Tensor):
    """Equal bits, signed zeros included. NaN only has to be NaN on both sides: x86 and CUDA produce
    different NaN payloads (0xffc00000 vs 0x7fffffff) for the same invalid operation."""
    a, b = cuda_out.detach().cpu().contiguous(), cpu_out.detach().cpu().contiguous()
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, a.shape, b.dtype, b.shape)
    if a.dtype in _BITS:
        both_nan = torch.isnan(a) & torch.isnan(b)
        differ = (a.view(_BITS[a.dtype]) != b.view(_BITS[a.dtype])) & ~both_nan
    else:
        differ = a != b
    where = differ.nonzero().flatten()[:10].tolist() if differ.dim() == 1 else differ.nonzero()[:10].tolist()
    assert not bool(differ.any()), f"CUDA and CPU differ at {where}"


def both(fn, G, **kwargs):
    return fn(G.cuda(), backend="cuda", nonfinite="propagate", **kwargs), fn(G, backend="cpu", nonfinite="propagate",
                                                                              **kwargs)


@pytest.mark.parametrize("d", DS)
@pytest.mark.parametrize("n", NS)
def test_sign_sum_identical(n, d):
    cuda_out, cpu_out = both(ops.sign_sum, awkward(n, d, 1))
    assert torch.equal(cuda_out.cpu(), cpu_out)


@pytest.mark.parametrize("d", DS)
@pytest.mark.parametrize("n", NS)
def test_median_and_trimmed_mean_bitwise(n, d):
    G = awkward(n, d, 2)
    assert_bitwise(*both(ops.median, G))
    trim = (n - 1) // 4
    assert_bitwise(*both(ops.trimmed_mean, G, trim=trim))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("n", [3, 20, 64, 100, 257])
def test_median_bitwise_other_dtypes(n, dtype):
    # The arithmetic dtype and the final rounding (nearest even) are the same on both backends.
    G = awkward(n, 1000, 9).clamp(-6e4, 6e4).to(dtype)
    assert_bitwise(*both(ops.median, G))
    assert_bitwise(*both(ops.trimmed_mean, G, trim=(n - 1) // 4))


@pytest.mark.parametrize("n", NS)
def test_order_mean_every_window_bitwise(n):
    G = awkward(n, 257, 3)
    windows = {(0, n), (0, 1), (n - 1, n), ((n - 1) // 2, n // 2 + 1), (n // 3, max(n // 3 + 1, 2 * n // 3))}
    for lo, hi in sorted(windows):
        assert_bitwise(*both(ops.order_mean, G, lo=lo, hi=hi))


def test_order_mean_signed_zero_columns_bitwise():
    # Columns of only -0 and +0: which zero lands in the kept window decides the sign of the result.
    for n in (5, 64, 100, 600):
        g = torch.Generator().manual_seed(n)
        signs = torch.rand(n, 333, generator=g) < 0.5
        G = torch.where(signs, torch.full((), -0.0), torch.zeros(()))
        for lo, hi in ((0, 1), ((n - 1) // 2, n // 2 + 1), (1, n - 1)):
            assert_bitwise(*both(ops.order_mean, G, lo=lo, hi=hi))


@pytest.mark.parametrize("n", NS)
def test_invariant_bitwise(n):
    G = awkward(n, 1000, 4)
    trim = (n - 1) // 4
    for tau in (0.0, 0.2, 0.6):
        (out_c, mask_c), (out_p, mask_p) = both(ops.invariant, G, tau=tau, trim=trim, return_mask=True)
        assert torch.equal(mask_c.cpu(), mask_p)
        assert_bitwise(out_c, out_p)


@pytest.mark.parametrize("n", NS)
def test_rlr_bitwise(n):
    G = awkward(n, 1000, 5)
    weights = torch.rand(n, generator=torch.Generator().manual_seed(n)) * 100 + 1
    theta = n // 2
    assert_bitwise(*both(ops.rlr, G, theta=theta))
    cuda_out = ops.rlr(G.cuda(), theta=theta, weights=weights.cuda(), server_lr=0.3, backend="cuda",
                       nonfinite="propagate")
    cpu_out = ops.rlr(G, theta=theta, weights=weights, server_lr=0.3, backend="cpu", nonfinite="propagate")
    assert_bitwise(cuda_out, cpu_out)


def overflowing(n: int, huge: float = 3e38) -> torch.Tensor:
    """float32 (n, 5), n >= 3: finite columns whose sums overflow float32, then one holding +Inf."""
    G = torch.zeros(n, 5)
    G[:2, 0] = huge                                  # two huge rows: mean 2 huge / n
    G[:, 1] = huge                                   # every row huge
    G[: n // 2, 2], G[n // 2:, 2] = huge, -huge      # cancelling halves
    G[:, 3] = torch.randn(n, generator=torch.Generator().manual_seed(n))
    G[:, 4] = G[:, 0]
    G[2, 4] = float("inf")                           # not finite: the overflowed mean is kept
    return G


@pytest.mark.parametrize("n", [3, 20, 65, 257])
def test_row_selections_bitwise(n):
    """The coordinate-wise ops on a selection (shuffled, a repeat, a NaN row left out) agree bit
    for bit, and with the same ops on the gathered rows."""
    G = awkward(n + 2, 1000, 11)
    G[n + 1, 7] = float("nan")                                  # never selected
    rows = torch.randperm(n + 1, generator=torch.Generator().manual_seed(n))[:n]
    rows[-1] = rows[0]
    weights = torch.rand(n + 2, generator=torch.Generator().manual_seed(n)) + 0.5
    calls = [(ops.sign_sum, {}), (ops.median, {}), (ops.trimmed_mean, {"trim": (n - 1) // 4}),
             (ops.closest_to_median_mean, {"beta": max(1, n - 2)}),
             (ops.invariant, {"tau": 0.2, "trim": (n - 1) // 4, "return_mask": True}),
             (ops.rlr, {"theta": n // 2, "weights": weights})]
    for fn, kw in calls:
        cuda_kw = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
        on_cuda = fn(G.cuda(), rows=rows.cuda(), backend="cuda", nonfinite="propagate", **cuda_kw)
        on_cpu = fn(G, rows=rows, backend="cpu", nonfinite="propagate", **kw)
        gathered_kw = {**kw, "weights": weights[rows]} if "weights" in kw else kw
        gathered = fn(G[rows], backend="cpu", nonfinite="propagate", **gathered_kw)
        for a, b, c in zip(*(out if isinstance(out, tuple) else (out,) for out in (on_cuda, on_cpu, gathered))):
            assert_bitwise(a, b)
            assert_bitwise(b, c)


@pytest.mark.parametrize("n", [18, 100, 130, 2100])
def test_order_statistics_of_overflowing_finite_values_bitwise(n):
    # Register kernels (and their redo kernel), the pruned network, selection: every path redoes an
    # overflowed kept sum of finite values with core's kept_mean_rescaled.
    G = overflowing(n)
    for fn, kwargs in ((ops.order_mean, dict(lo=0, hi=n)), (ops.order_mean, dict(lo=0, hi=n - 1)),
                       (ops.median, {}), (ops.trimmed_mean, dict(trim=1))):
        cuda_out, cpu_out = both(fn, G, **kwargs)
        assert_bitwise(cuda_out, cpu_out)
        assert torch.isfinite(cuda_out[:4]).all()


def test_rlr_of_overflowing_finite_rows_bitwise():
    G = overflowing(18)
    weights = torch.linspace(1.0, 100.0, 18)
    assert_bitwise(*both(ops.rlr, G, theta=0))
    cuda_out = ops.rlr(G.cuda(), theta=18, weights=weights.cuda(), server_lr=0.5, backend="cuda",
                       nonfinite="propagate")
    cpu_out = ops.rlr(G, theta=18, weights=weights, server_lr=0.5, backend="cpu", nonfinite="propagate")
    assert_bitwise(cuda_out, cpu_out)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_topk_ef_step_saturating_state_bitwise(dtype):
    # Momentum and error saturate at the largest finite value of the storage dtype on both.
    limit = torch.finfo(dtype).max
    big = 6e4 if dtype == torch.float16 else limit * 0.75
    u = torch.full((50_021,), big, dtype=dtype)
    u[::3] = -big
    state = {"cuda": (torch.zeros_like(u).cuda(), torch.zeros_like(u).cuda()),
             "cpu": (torch.zeros_like(u), torch.zeros_like(u))}
    for k in (0, 0, 5):
        i_c, v_c = ops.topk_ef_step(u.cuda(), *state["cuda"], k=k, rho=0.9, backend="cuda")
        i_p, v_p = ops.topk_ef_step(u, *state["cpu"], k=k, rho=0.9, backend="cpu")
        assert torch.equal(i_c.cpu(), i_p)
        assert_bitwise(v_c, v_p)
        assert_bitwise(state["cuda"][0], state["cpu"][0])
        assert_bitwise(state["cuda"][1], state["cpu"][1])
    assert torch.isfinite(state["cuda"][0]).all() and torch.equal(v_c.abs().cpu(), torch.full((5,), limit, dtype=dtype))


def huge_and_tiny_float64_rows(d: int = 5000) -> torch.Tensor:
    g = torch.Generator().manual_seed(21)
    base = torch.randn(4, d, generator=g, dtype=torch.float64)
    return torch.stack([base[0] * 1e200, base[1] * 1e-200, torch.full((d,), 5e-324, dtype=torch.float64),
                        torch.zeros(d, dtype=torch.float64), base[2], base[3] * 1e-140])


def close_float64(cuda_out, cpu_out):
    """Relative float64 agreement (atol 0: the statistics of tiny rows are far below any atol)."""
    assert cuda_out.dtype == cpu_out.dtype == torch.float64
    torch.testing.assert_close(cuda_out.cpu(), cpu_out, rtol=1e-12, atol=0.0, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_client_stats_float64_statistics(dtype):
    G = awkward(9, 5000, 13).clamp(-6e4, 6e4).to(dtype)
    ref = torch.randn(5000, generator=torch.Generator().manual_seed(14)).to(dtype)
    cuda_stats = ops.client_stats(G.cuda(), (100, 3000), ref.cuda(), backend="cuda", nonfinite="propagate")
    cpu_stats = ops.client_stats(G, (100, 3000), ref, backend="cpu", nonfinite="propagate")
    for name in ("norm", "sign_frac", "dot", "ref_norm", "ref_dist"):
        close_float64(getattr(cuda_stats, name), getattr(cpu_stats, name))


def test_client_stats_and_clip_rows_of_huge_and_tiny_float64_rows():
    # Scaled sums (docs/nonfinite.md): every norm, distance and dot product that fits float64 is returned.
    G = huge_and_tiny_float64_rows()
    ref = torch.randn(5000, generator=torch.Generator().manual_seed(22), dtype=torch.float64) * 1e-200
    cuda_stats = ops.client_stats(G.cuda(), ref=ref.cuda(), backend="cuda")
    cpu_stats = ops.client_stats(G, ref=ref, backend="cpu")
    for name in ("norm", "dot", "ref_norm", "ref_dist"):
        close_float64(getattr(cuda_stats, name), getattr(cpu_stats, name))
    assert torch.isfinite(cuda_stats.norm).all() and bool(cuda_stats.finite.all())
    max_norm = torch.tensor([1.0, 1e-250, 1e-320, 0.0, 2.0, 1e300], dtype=torch.float64)
    close_float64(ops.clip_rows(G.cuda(), max_norm.cuda(), backend="cuda"), ops.clip_rows(G, max_norm, backend="cpu"))


def test_pairwise_float64_outputs_and_unsafe_rows():
    # [n, n] float64 for every dtype; float64 rows whose Gram diagonal overflows or underflows take the
    # direct pass with scaled products on both backends.
    G = awkward(20, 1000, 15).clamp(-6e4, 6e4)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        X = G.to(dtype)
        for fn in (ops.pairwise_sqdist, ops.pairwise_cosine):
            cuda_out, cpu_out = both(fn, X)
            assert cuda_out.dtype == torch.float64
            torch.testing.assert_close(cuda_out.cpu(), cpu_out, rtol=1e-9, atol=1e-9)
    H = huge_and_tiny_float64_rows()
    cos_cuda, cos_cpu = both(ops.pairwise_cosine, H)
    torch.testing.assert_close(cos_cuda.cpu(), cos_cpu, rtol=1e-12, atol=1e-12)
    sq_cuda, sq_cpu = both(ops.pairwise_sqdist, H)
    close_float64(sq_cuda, sq_cpu)
    assert torch.isfinite(cos_cuda).all()


@pytest.mark.parametrize("restore", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_maxpool_amplify_identical(dtype, restore):
    # Max-pooling only moves values, so both backends must agree exactly.
    shapes = [(16, 3, 3, 3), (16,), (32, 16, 3, 3), (32,), (10, 32), (10,), (5, 7)]
    layout = robustagg.layout.Layout.from_shapes(shapes)
    G = awkward(7, layout.d, 11).round().to(dtype)
    for kernel in (1, 2, 3):
        assert_bitwise(*both(ops.maxpool_amplify, G, layout=layout, kernel=kernel, restore=restore))
    flat = robustagg.layout.Layout.flat(100, skip_tail=17)
    assert_bitwise(*both(ops.maxpool_amplify, G, layout=flat, kernel=2, restore=restore))


@pytest.mark.parametrize("d", [1, 7, 4097, 100_003])
def test_topk_abs_same_selection(d):
    x = awkward(1, d, 6)[0]
    for k in (0, 1, max(1, d // 100), d // 2, d, d + 5):
        (i_c, v_c), (i_p, v_p) = both(ops.topk_abs, x, k=k)
        assert torch.equal(i_c.cpu(), i_p), f"k={k}"
        assert_bitwise(v_c, v_p)


def test_topk_abs_float64_same_selection():
    """float64 keys take six digits: passes 3 to 6 read only the candidate buffer."""
    x = awkward(1, 100_003, 11)[0].double() * torch.linspace(0.5, 2.0, 100_003, dtype=torch.float64)
    for k in (1, 1000, 50_000):
        (i_c, v_c), (i_p, v_p) = both(ops.topk_abs, x, k=k)
        assert torch.equal(i_c.cpu(), i_p), f"k={k}"
        assert_bitwise(v_c, v_p)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_topk_abs_all_magnitudes_equal_takes_the_lowest_indices(dtype):
    """Every key survives every digit: the candidate buffer stays full and all of it is ties."""
    g = torch.Generator().manual_seed(12)
    x = torch.where(torch.rand(70_001, generator=g) < 0.5, -1.0, 1.0).to(dtype)
    (i_c, v_c), (i_p, v_p) = both(ops.topk_abs, x, k=20_000)
    assert i_c.cpu().tolist() == i_p.tolist() == list(range(20_000))
    assert_bitwise(v_c, v_p)


def test_topk_abs_ties_go_to_lower_index_on_both():
    x = torch.tensor([1.0, -2.0, 2.0, -2.0, 0.5, 2.0, -0.0, 0.0])
    (i_c, _), (i_p, _) = both(ops.topk_abs, x, k=3)
    assert i_c.cpu().tolist() == i_p.tolist() == [1, 2, 3]


@pytest.mark.parametrize("rho", [0.0, 0.9])
def test_topk_ef_step_same_selection_and_state(rho):
    d = 50_021
    g = torch.Generator().manual_seed(7)
    err = torch.randn(d, generator=g)
    mom = torch.randn(d, generator=g)
    state = {"cuda": (err.cuda(), mom.cuda()), "cpu": (err.clone(), mom.clone())}
    for step in range(3):
        u = awkward(1, d, 10 + step)[0]
        (i_c, v_c) = ops.topk_ef_step(u.cuda(), *state["cuda"], k=d // 100, rho=rho, backend="cuda")
        (i_p, v_p) = ops.topk_ef_step(u, *state["cpu"], k=d // 100, rho=rho, backend="cpu")
        assert torch.equal(i_c.cpu(), i_p), f"step {step}"
        assert_bitwise(v_c, v_p)
        assert_bitwise(state["cuda"][0], state["cpu"][0])
        assert_bitwise(state["cuda"][1], state["cpu"][1])


def test_topk_ef_step_nonfinite_leaves_state_untouched():
    d = 1000
    u = torch.randn(d, device="cuda")
    u[17] = float("nan")
    err, mom = torch.randn(d, device="cuda"), torch.randn(d, device="cuda")
    before = (err.clone(), mom.clone())
    with pytest.raises(ValueError, match="NaN or Inf"):
        ops.topk_ef_step(u, err, mom, k=10, rho=0.9, backend="cuda")
    assert torch.equal(err, before[0]) and torch.equal(mom, before[1])


def test_cuda_results_are_deterministic():
    G = awkward(100, 20_011, 8).cuda()
    for fn in (ops.median, lambda X, **kw: ops.trimmed_mean(X, 10, **kw), ops.pairwise_sqdist, ops.pairwise_cosine):
        first = fn(G, backend="cuda", nonfinite="propagate")
        assert_bitwise(fn(G, backend="cuda", nonfinite="propagate"), first)
    stats = [ops.client_stats(G, ref=G[0], backend="cuda", nonfinite="propagate") for _ in range(2)]
    for name in ("norm", "sign_frac", "dot", "ref_norm", "ref_dist"):
        assert_bitwise(getattr(stats[0], name), getattr(stats[1], name))
