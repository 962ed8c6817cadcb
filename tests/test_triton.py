"""Triton-specific tests: every Triton op against robustagg.reference, the kernels' own edge cases
(tile and block boundaries, the radix-select path for n > 256, ties in the top-k radix select,
segment tables, row selections read in place), huge and tiny finite values (docs/nonfinite.md: no finite
input may give Inf/NaN where the exact result is finite), the registration as torch.ops.robustagg_triton.*,
and determinism.

Without a GPU these run under TRITON_INTERPRET=1 on CPU tensors (conftest sets it), which is slow:
shapes stay small, and each case targets one kernel path.
"""
import os
import subprocess
import sys

import pytest
import torch

import robustagg
from robustagg import NonFiniteUpdateError, reference
from robustagg._registry import RAW_OPS
from robustagg.layout import Layout

from conftest import DEVICE, DTYPES, _backend, assert_close, to_reference

pytestmark = [
    pytest.mark.skipif(_backend._unavailable_reason("triton", None, DEVICE) is not None,
                       reason=str(_backend._unavailable_reason("triton", None, DEVICE))),
    # the interpreter evaluates NaN/Inf arithmetic with numpy, which warns; the results are checked
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
]

T = "triton"
RAW = torch.ops.robustagg_triton  # the raw ops, whose outputs do not depend on robustagg.ops
FLT_MAX = torch.finfo(torch.float32).max

try:  # block sizes of the active mode (interpreter or GPU), for the boundary cases below
    from robustagg import _triton_ops  # noqa: F401  (makes robustagg.triton_kernels importable)
    from robustagg.triton_kernels import settings as _settings
    from robustagg.triton_kernels.topk import HISTOGRAM_STEPS
    COLUMN_BLOCK = _settings.column_settings(1)[1]
    SORT_BLOCK_N5 = _settings.sort_settings(5)[1]
    ROW_BLOCK = _settings.row_settings(1 << 20)[1]
    FLAT_BLOCK = _settings.flat_settings()[0]
    PAIR_BLOCK = _settings.pairwise_settings()[0]
except ImportError:  # no triton: every test below is skipped
    COLUMN_BLOCK, SORT_BLOCK_N5, ROW_BLOCK, FLAT_BLOCK, HISTOGRAM_STEPS, PAIR_BLOCK = 512, 256, 1024, 1024, 8, 16
ALL_OPS = sorted(name for name, op in RAW_OPS.items() if op.triton_launcher)
N_VALUES = [1, 2, 3, 5, 20, 33, 64, 100, 257]
ALL_KERNELS = ["_sign_sum_kernel", "_rlr_kernel", "_order_mean_kernel", "_order_mean_select_kernel", "_closest_kernel",
               "_closest_select_kernel", "_client_stats_kernel", "_clip_rows_kernel", "_ef_update_kernel",
               "_histogram_kernel", "_pick_digit_kernel", "_count_kernel", "_select_kernel", "_maxpool_kernel",
               "_pairwise_kernel"]


def _ops():
    from robustagg import _triton_ops
    return _triton_ops


def _randn(n, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g).to(dtype).to(DEVICE)


# ---------------------------------------------------------------- registration

def test_triton_backend_is_available_and_selected_explicitly():
    assert robustagg.available_backends()["triton"] == "available"
    assert _backend.select("order_mean", DEVICE, "triton") == "triton"
    assert _backend.raw_op("order_mean", "triton") is torch.ops.robustagg_triton.order_mean


def test_every_schema_op_is_registered_under_robustagg_triton():
    ops = _ops()
    assert sorted(ops.OPS) == sorted(ALL_OPS)
    for name in ALL_OPS:
        assert ops.OPS[name] is getattr(torch.ops.robustagg_triton, name)


def test_topk_ef_step_declares_its_mutations():
    schema = torch.ops.robustagg_triton.topk_ef_step.default._schema
    mutated = [a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write]
    assert mutated == ["error", "momentum"]


@pytest.mark.parametrize("name", ALL_OPS)
def test_opcheck(name):
    torch.library.opcheck(_ops().OPS[name], RAW_OPS[name].sample(DEVICE))


# ---------------------------------------------------------------- sign votes, rlr

@pytest.mark.parametrize("n", N_VALUES)
def test_sign_sum_matches_reference(n):
    G = _randn(n, COLUMN_BLOCK + 1, torch.float32, seed=n)
    G[:, :7] = 0.0
    G[0, :3] = -0.0
    assert torch.equal(robustagg.sign_sum(G, backend=T).cpu(), reference.sign_sum(G.cpu()))


@pytest.mark.parametrize("dtype", DTYPES)
def test_sign_sum_every_dtype(dtype):
    G = _randn(9, COLUMN_BLOCK - 1, dtype)
    assert torch.equal(robustagg.sign_sum(G, backend=T).cpu(), reference.sign_sum(G.cpu()))


def test_sign_agreement_uses_the_triton_sign_sum():
    G = _randn(7, 300, torch.float32)
    G[:, :5] = G[:, :5].abs()
    out = robustagg.sign_agreement(G, backend=T)
    assert torch.equal(out.cpu(), reference.sign_agreement(G.cpu()))
    assert torch.equal(out[:5].cpu(), torch.ones(5))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weighted", [False, True])
def test_rlr_matches_reference(dtype, weighted):
    G = _randn(20, COLUMN_BLOCK * 2 + 1, dtype)
    w = torch.rand(20, generator=torch.Generator().manual_seed(1)).to(DEVICE) if weighted else None
    out = robustagg.rlr(G, 12, weights=w, server_lr=0.5, backend=T)
    expected = reference.rlr(to_reference(G), 12, None if w is None else w.double().cpu(), 0.5)
    assert_close(out, expected, dtype)


def test_rlr_theta_zero_keeps_every_sign():
    G = _randn(20, 65, torch.float32)
    assert_close(robustagg.rlr(G, 0, backend=T), to_reference(G).mean(0), torch.float32)


def test_rlr_theta_n_flips_every_split_coordinate():
    G = _randn(20, 65, torch.float32).abs()
    G[0] = -G[0]  # no coordinate is unanimous
    assert_close(robustagg.rlr(G, 20, server_lr=2.0, backend=T), -2.0 * to_reference(G).mean(0), torch.float32)


def _two_huge_rows(n_zero_rows, dtype=torch.float32, huge=3e38):
    """Two rows of `huge` over `n_zero_rows` zero rows: the sum of a column overflows, its mean does not."""
    return torch.cat([torch.full((2, 3), huge, dtype=dtype), torch.zeros(n_zero_rows, 3, dtype=dtype)]).to(DEVICE)


@pytest.mark.parametrize("weighted", [False, True])
def test_rlr_mean_of_rows_whose_sum_overflows_is_finite(weighted):
    X = _two_huge_rows(16)
    w = torch.linspace(1.0, 2.0, 18).to(DEVICE) if weighted else None
    out, flags = RAW.rlr(X, w, 0, 1.0)
    expected = reference.rlr(X.cpu(), 0, None if w is None else w.cpu(), 1.0)
    assert torch.isfinite(out).all() and not flags.any()
    assert_close(out, expected, torch.float32)
    if not weighted:
        assert_close(out, torch.full((3,), 6e38 / 18, dtype=torch.float64), torch.float32)


def _opposite_huge_rows(n):
    """n/2 rows of -3e38 over n/2 rows of 3e38: partial sums reach -Inf and +Inf, and a tree sum
    adds them to NaN (it does for these n, in the interpreter as well); the exact mean is 0."""
    return torch.tensor([-3e38] * (n // 2) + [3e38] * (n // 2))[:, None].repeat(1, 3).to(DEVICE)


def test_rlr_sum_that_overflows_to_nan_in_a_tree_is_rescued():
    out, _ = RAW.rlr(_opposite_huge_rows(300), None, 0, 1.0)
    assert torch.isfinite(out).all() and out.abs().max() <= 3e38 * 1e-12


def test_rlr_float64_rows_near_the_largest_double():
    X = _two_huge_rows(1, torch.float64, 1.7e308)
    out, _ = RAW.rlr(X, None, 0, 0.5)
    mean = 1.7e308 / 3 * 2  # (1.7e308 + 1.7e308 + 0) / 3, whose sum is beyond float64
    torch.testing.assert_close(out.cpu(), torch.full((3,), 0.5 * mean, dtype=torch.float64), rtol=1e-12, atol=0.0)


def test_rlr_column_with_inf_keeps_the_overflow():
    X = _two_huge_rows(4)
    X[5, 1] = float("inf")
    out, flags = RAW.rlr(X, None, 0, 1.0)
    assert flags.cpu().tolist() == [False] * 5 + [True]
    assert torch.isfinite(out[[0, 2]]).all() and out[1] == float("inf")


# ---------------------------------------------------------------- order statistics

@pytest.mark.parametrize("n", N_VALUES)
def test_trimmed_mean_and_median_match_reference(n):
    G = _randn(n, 33, torch.float32, seed=n)
    ref = to_reference(G)
    trim = (n - 1) // 4
    assert_close(robustagg.trimmed_mean(G, trim, backend=T), reference.trimmed_mean(ref, trim), torch.float32)
    assert_close(robustagg.median(G, backend=T), reference.median(ref), torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [5, 300])
def test_order_mean_every_dtype_both_paths(dtype, n):
    G = _randn(n, 9, dtype)
    lo, hi = n // 3, n - n // 5
    assert_close(robustagg.order_mean(G, lo, hi, backend=T), reference.order_mean(to_reference(G), lo, hi), dtype)


def test_order_mean_large_n_513():
    G = _randn(513, 5, torch.float32)
    for lo, hi in [(0, 1), (512, 513), (100, 413), (256, 257)]:
        assert_close(robustagg.order_mean(G, lo, hi, backend=T), reference.order_mean(to_reference(G), lo, hi),
                     torch.float32)


@pytest.mark.parametrize("d", [1, 7, SORT_BLOCK_N5 - 1, SORT_BLOCK_N5, SORT_BLOCK_N5 + 1])
def test_order_mean_tile_boundaries(d):
    # n = 5 pads to 8 rows and a tile of SORT_BLOCK_N5 columns (kernels/settings.py sort_settings)
    G = _randn(5, d, torch.float32)
    assert_close(robustagg.order_mean(G, 1, 4, backend=T), reference.order_mean(to_reference(G), 1, 4), torch.float32)


@pytest.mark.parametrize("n", [6, 300])
def test_order_mean_ties_and_signed_zeros(n):
    col_equal = torch.full((n, 1), 2.5)
    col_zeros = torch.where(torch.arange(n)[:, None] % 2 == 0, torch.tensor(-0.0), torch.tensor(0.0))
    col_steps = (torch.arange(n)[:, None] // 3).float()  # runs of three equal values
    G = torch.cat([col_equal, col_zeros, col_steps], dim=1).to(DEVICE)
    for lo, hi in [(1, n - 1), (n // 2, n // 2 + 1), (2, 5)]:
        out = robustagg.order_mean(G, lo, hi, backend=T).cpu()
        assert out[0] == 2.5
        assert out[1] == 0.0
        assert_close(out, reference.order_mean(to_reference(G), lo, hi), torch.float32)


@pytest.mark.parametrize("n", [7, 300])
def test_order_mean_trimmed_huge_outliers_keep_honest_values_exact(n):
    G = torch.ones(n, 3)
    G[0] = 3e38
    G[1] = -3e38
    G = G.to(DEVICE)
    out = robustagg.trimmed_mean(G, 1, backend=T)
    assert torch.equal(out.cpu(), torch.ones(3))


def test_order_mean_subnormals():
    G = (torch.arange(1, 6, dtype=torch.float32)[:, None] * 1e-44).repeat(1, 3).to(DEVICE)
    assert_close(robustagg.median(G, backend=T), reference.median(to_reference(G)), torch.float32)
    assert robustagg.median(G, backend=T).cpu()[0] > 0


@pytest.mark.parametrize("n", [2, 300])
def test_median_of_huge_equal_values_is_that_value(n):
    # the two middle values of an even n add up to 6e38, beyond float32; both paths redo the sum
    X = torch.full((n, 3), 3e38).to(DEVICE)
    out, flags = RAW.order_mean(X, n // 2 - 1, n // 2 + 1)
    assert torch.equal(out.cpu(), torch.full((3,), 3e38)) and not flags.any()


@pytest.mark.parametrize("zero_rows", [16, 298])
def test_trimmed_mean_of_rows_whose_sum_overflows_is_finite(zero_rows):
    X = _two_huge_rows(zero_rows)
    n = zero_rows + 2
    out, _ = RAW.order_mean(X, 0, n)
    assert_close(out, reference.trimmed_mean(to_reference(X), 0), torch.float32)
    assert_close(out, torch.full((3,), 6e38 / n, dtype=torch.float64), torch.float32)
    assert_close(robustagg.trimmed_mean(X, 0, backend=T), torch.full((3,), 6e38 / n, dtype=torch.float64),
                 torch.float32)
    masked, mask, _ = RAW.invariant(X, 0, n, 2)
    assert mask.all() and torch.equal(masked, out)


@pytest.mark.parametrize("n", [8, 300])
def test_order_mean_sum_that_overflows_to_nan_in_a_tree_is_rescued(n):
    out, _ = RAW.order_mean(_opposite_huge_rows(n), 0, n)
    assert torch.equal(out.cpu(), torch.zeros(3))  # the rescaled values are multiples of 3e38 / 2^m: exact


@pytest.mark.parametrize("n", [3, 300])
def test_order_mean_float64_near_the_largest_double(n):
    X = torch.full((n, 2), 1.7e308, dtype=torch.float64).to(DEVICE)
    X[:, 1] = -1.7e308
    out, _ = RAW.order_mean(X, 0, n)
    assert torch.equal(out.cpu(), torch.tensor([1.7e308, -1.7e308], dtype=torch.float64))


@pytest.mark.parametrize("n", [5, 300])
def test_order_mean_column_with_inf_is_not_rescued(n):
    X = torch.full((n, 2), 3e38).to(DEVICE)
    X[1, 1] = float("inf")
    out, flags = RAW.order_mean(X, 0, n)
    assert out[0] == 3e38 and out[1] == float("inf") and flags.cpu().tolist() == [False, True] + [False] * (n - 2)


@pytest.mark.parametrize("n", [20, 300])
@pytest.mark.parametrize("strict", [True, False])
def test_invariant_matches_reference(n, strict):
    G = _randn(n, 17, torch.float32, seed=3)
    G[:, :4] = G[:, :4].abs()  # unanimous columns pass every tau
    out, mask = robustagg.invariant(G, 0.2, n // 4, strict, return_mask=True, backend=T)
    ref_out, ref_mask = reference.invariant(to_reference(G), 0.2, n // 4, strict, return_mask=True)
    assert torch.equal(mask.cpu(), ref_mask)
    assert_close(out, ref_out, torch.float32)


# ---------------------------------------------------------------- non-finite rows under each policy

def _with_bad_rows(n=9, d=40):
    G = _randn(n, d, torch.float32, seed=7)
    G[2, 5] = float("nan")
    G[6, 0] = float("-inf")
    return G


COORDINATEWISE = {
    "sign_sum": (lambda G, **kw: robustagg.sign_sum(G, **kw), reference.sign_sum),
    "trimmed_mean": (lambda G, **kw: robustagg.trimmed_mean(G, 1, **kw), lambda X: reference.trimmed_mean(X, 1)),
    "median": (lambda G, **kw: robustagg.median(G, **kw), reference.median),
    "invariant": (lambda G, **kw: robustagg.invariant(G, 0.5, 1, **kw), lambda X: reference.invariant(X, 0.5, 1)),
    "rlr": (lambda G, **kw: robustagg.rlr(G, 3, **kw), lambda X: reference.rlr(X, 3)),
}


@pytest.mark.parametrize("name", sorted(COORDINATEWISE))
def test_nonfinite_rows_raise_with_client_indices(name):
    fn, _ = COORDINATEWISE[name]
    with pytest.raises(NonFiniteUpdateError) as info:
        fn(_with_bad_rows(), backend=T)
    assert list(info.value.clients) == [2, 6]


@pytest.mark.parametrize("name", sorted(COORDINATEWISE))
def test_nonfinite_rows_drop_equals_reference_on_finite_rows(name):
    fn, ref = COORDINATEWISE[name]
    G = _with_bad_rows()
    kept = to_reference(G)[[0, 1, 3, 4, 5, 7, 8]]
    out = fn(G, nonfinite="drop", backend=T)
    assert_close(out, ref(kept), torch.float32)


@pytest.mark.parametrize("name", sorted(COORDINATEWISE))
def test_nonfinite_rows_propagate_does_not_raise_and_keeps_clean_columns(name):
    fn, ref = COORDINATEWISE[name]
    G = _with_bad_rows()
    out = fn(G, nonfinite="propagate", backend=T)
    clean = slice(6, None)  # columns without a NaN/Inf
    assert_close(out[clean], ref(to_reference(G))[clean], torch.float32)


def test_nonfinite_rows_large_n_path_are_flagged():
    G = _randn(300, 5, torch.float32)
    G[299, 4] = float("inf")
    with pytest.raises(NonFiniteUpdateError) as info:
        robustagg.median(G, backend=T)
    assert list(info.value.clients) == [299]


def test_per_client_ops_drop_gives_nan_rows():
    G = _with_bad_rows()
    stats = robustagg.client_stats(G, nonfinite="drop", backend=T)
    assert stats.finite.cpu().tolist() == [True, True, False, True, True, True, False, True, True]
    assert torch.isnan(stats.norm[[2, 6]]).all() and torch.isfinite(stats.norm[[0, 1, 3]]).all()
    D = robustagg.pairwise_sqdist(G, nonfinite="drop", backend=T)
    assert torch.isnan(D[2]).all() and torch.isnan(D[:, 6]).all() and torch.isfinite(D[0, [0, 1, 3]]).all()
    with pytest.raises(NonFiniteUpdateError):
        robustagg.clip_rows(G, 1.0, backend=T)


# ---------------------------------------------------------------- row selections

TORCH_RAW = torch.ops.robustagg_torch
SELECTING_OPS = ["closest_to_median_mean", "invariant", "order_mean", "rlr", "sign_sum"]
_BITS = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(t):
    """t with floats as their bit patterns, so that torch.equal compares NaNs too."""
    return t.view(_BITS[t.element_size()]) if t.is_floating_point() else t


def _selection_case(n, m, d, dtype, seed=0):
    """(G, rows): m >= 4 of G's n rows, m - 1 distinct in random order plus a repeat of one of them.
    Row ``skipped`` holds a NaN (column 1) and an Inf (column 2) but is not selected; one selected row
    holds a NaN in column 0, so columns 1.. stay clean. The values are multiples of 1/8 in [-5, 5],
    exact in every dtype, so that closest_to_median_mean picks the same values as the float64
    reference (tests/test_closest_to_median_mean.py) and ties in distance are common."""
    g = torch.Generator().manual_seed(seed)
    G = (torch.randint(-40, 41, (n, d), generator=g).double() / 8).to(dtype)
    order = torch.randperm(n, generator=g)
    skipped, distinct = order[0], order[1:m]
    G[skipped, 1], G[skipped, 2] = float("nan"), float("inf")
    G[distinct[(m - 1) // 2], 0] = float("nan")
    at = int(torch.randint(0, m, (1,), generator=g))
    rows = torch.cat([distinct[:at], distinct[-1:], distinct[at:]])
    return G.to(DEVICE), rows.to(DEVICE)


def _selection_args(name, m):
    """The op's arguments after G, for m selected rows (Bulyan's beta = m - 2f, trimmed ranks)."""
    f = m // 4
    return {"sign_sum": (), "order_mean": (f, m - f), "invariant": (f, m - f, m // 3),
            "closest_to_median_mean": (m - 2 * f,),
            "rlr": (torch.linspace(0.5, 2.0, m).to(DEVICE), m // 2, 0.5)}[name]


def _reference_args(args):
    return tuple(to_reference(a) if isinstance(a, torch.Tensor) else a for a in args)


def _check_selection(name, G, rows, args, dtype):
    """The op on the selection: bitwise the op on G.index_select(0, rows), and on the clean columns
    the torch backend on the float64 selection; the flags are the selected rows' own, in order."""
    op = getattr(RAW, name)
    selected = op(G, *args, rows)
    copied = op(G.index_select(0, rows), *args)
    assert len(selected) == len(copied)
    for a, b in zip(selected, copied):
        assert a.shape == b.shape and a.dtype == b.dtype and torch.equal(_bits(a), _bits(b))
    expected = getattr(TORCH_RAW, name)(to_reference(G), *_reference_args(args), rows.cpu())
    assert torch.equal(selected[-1].cpu(), expected[-1])
    assert selected[-1].sum() == 1  # the skipped row's NaN and Inf are not read
    for a, b in zip(selected[:-1], expected[:-1]):
        if a.is_floating_point():
            assert_close(a[1:], b[1:], dtype)
        else:
            assert torch.equal(a[1:].cpu(), b[1:].to(a.dtype))
    return selected


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", SELECTING_OPS)
def test_row_selection_equals_the_op_on_the_selected_copy(name, dtype):
    # m = 15 of 20 rows: the one-tile sort of the order statistics, across two column blocks
    G, rows = _selection_case(20, 15, COLUMN_BLOCK + 1, dtype, seed=1)
    _check_selection(name, G, rows, _selection_args(name, 15), dtype)


@pytest.mark.parametrize("name,dtype", [("order_mean", dtype) for dtype in DTYPES] +
                         [("invariant", torch.float32), ("closest_to_median_mean", torch.float32)])
def test_row_selection_on_the_radix_select_path(name, dtype):
    # m = 258 of 270 rows: beyond MAX_SORT_N, where every pass over the column re-reads the selection
    G, rows = _selection_case(270, 258, 5, dtype, seed=2)
    _check_selection(name, G, rows, _selection_args(name, 258), dtype)


@pytest.mark.parametrize("m,path", [(200, "sort"), (257, "select")])
def test_row_selection_picks_the_path_by_the_selected_count(m, path):
    # of 300 rows (the radix select's side of MAX_SORT_N), m <= 256 selected rows fit the one-tile sort
    from robustagg.triton_kernels import order_stats
    G, rows = torch.zeros(300, 3), torch.arange(m)
    kernels = {"sort": ["_order_mean_kernel", "_closest_kernel"],
               "select": ["_order_mean_select_kernel", "_closest_select_kernel"]}[path]
    rec = _LaunchRecorder()
    _, flags = order_stats.order_mean_forward(G, 1, m - 1, rows, launch=rec)
    _, closest_flags = order_stats.closest_to_median_mean_forward(G, 5, rows, launch=rec)
    assert [kernel.fn.__name__ for kernel, _, _ in rec.calls] == kernels
    assert [args[kernel.arg_names.index("n")] for kernel, args, _ in rec.calls] == [m, m]
    assert flags.shape == closest_flags.shape == (m,)


@pytest.mark.parametrize("name", SELECTING_OPS)
def test_row_selection_of_one_row(name):
    G = _randn(6, 9, torch.float32, seed=4)
    rows = torch.tensor([4], device=DEVICE)
    args = {"order_mean": (0, 1), "invariant": (0, 1, 1), "closest_to_median_mean": (1,),
            "rlr": (None, 1, 1.0)}.get(name, ())
    out = getattr(RAW, name)(G, *args, rows)
    assert out[-1].cpu().tolist() == [False]
    if name == "sign_sum":
        assert torch.equal(out[0].cpu(), reference.sign_sum(G[4:5].cpu()))
    else:
        assert torch.equal(out[0], G[4])  # the one value of each column, unanimous, with lr 1


def test_row_selection_ties_in_distance_go_to_the_lower_position():
    # per column the median is 0 and the values -1 and 1 are equally near: beta = 2 keeps the 0 and
    # whichever of them comes first in the selection, not in G
    G = torch.tensor([[-1.0], [0.0], [1.0]]).to(DEVICE)
    for rows, mean in [([0, 1, 2], -0.5), ([2, 1, 0], 0.5), ([1, 2, 0], 0.5)]:
        out, _ = RAW.closest_to_median_mean(G, 2, torch.tensor(rows, device=DEVICE))
        assert out.cpu().tolist() == [mean], rows


def test_row_selection_by_keyword_and_every_row_selected():
    G, rows = _selection_case(7, 7, 11, torch.float32, seed=5)
    every = torch.arange(7, device=DEVICE)
    for name in SELECTING_OPS:
        args = _selection_args(name, 7)
        op = getattr(RAW, name)
        assert all(torch.equal(_bits(a), _bits(b)) for a, b in zip(op(G, *args, rows=rows), op(G, *args, rows)))
        assert all(torch.equal(_bits(a), _bits(b)) for a, b in zip(op(G, *args, every), op(G, *args))), name


@pytest.mark.parametrize("name", SELECTING_OPS)
def test_opcheck_with_rows(name):
    G, rows = _randn(9, 40, torch.float32, seed=6), torch.tensor([7, 0, 3, 3, 8, 1], device=DEVICE)
    torch.library.opcheck(_ops().OPS[name], (G, *_selection_args(name, 6), rows))


def test_row_selection_traced_on_fake_tensors_checks_the_range_in_the_graph():
    # torch.compile traces a triton_op's launcher on fake tensors, whose values cannot be read there
    from torch.fx.experimental.proxy_tensor import make_fx
    from robustagg.triton_kernels.common import row_selection
    traced = make_fx(lambda G, rows: row_selection(G, rows, "order_mean")[0], tracing_mode="fake")(
        torch.zeros(5, 3), torch.tensor([0, 4]))
    assert torch.equal(traced(torch.zeros(5, 3), torch.tensor([4, 1])), torch.tensor([4, 1]))
    with pytest.raises(RuntimeError, match=r"order_mean: rows holds a row number outside the allowed \[0, 4\] for n=5"):
        traced(torch.zeros(5, 3), torch.tensor([0, 5]))


BAD_ROWS = {  # rows for G of 5 rows, and the message's tail
    "int32": (torch.tensor([0, 1, 2], dtype=torch.int32),
              r"rows must be a 1-D int64 tensor of row numbers, got torch.int32 of shape \[3\]"),
    "2-D": (torch.tensor([[0, 1, 2]]), r"rows must be a 1-D int64 tensor of row numbers, got torch.int64 of shape "
                                       r"\[1, 3\]"),
    "empty": (torch.zeros(0, dtype=torch.int64), r"rows selects m=0 rows; allowed 1 <= m <= n=5"),
    "more than n": (torch.tensor([0, 1, 2, 3, 4, 0]), r"rows selects m=6 rows; allowed 1 <= m <= n=5"),
    "n": (torch.tensor([3, 5, 1]), r"rows holds row numbers from 1 to 5; allowed \[0, 4\] for n=5"),
    "negative": (torch.tensor([2, -1]), r"rows holds row numbers from -1 to 2; allowed \[0, 4\] for n=5"),
}


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
@pytest.mark.parametrize("name", SELECTING_OPS)
def test_row_selection_rejects_bad_rows(name, case):
    # the kernels take their addresses from rows: csrc/checks.h rows_arg's checks and messages,
    # before anything is launched
    rows, message = BAD_ROWS[case]
    args = {"rlr": (None, 1, 1.0)}.get(name, _selection_args(name, 1))
    with pytest.raises(RuntimeError, match=f"{name}: {message}"):
        getattr(RAW, name)(_randn(5, 7, torch.float32), *args, rows.to(DEVICE))


@pytest.mark.parametrize("name", SELECTING_OPS)
def test_row_selection_rejects_rows_on_another_device(name):
    # the launcher itself: the dispatcher would send a CPU G with meta rows to the fake
    from robustagg.triton_kernels import order_stats, sign_votes
    module, launcher = RAW_OPS[name].triton_launcher.split(".")
    forward = getattr({"order_stats": order_stats, "sign_votes": sign_votes}[module], launcher)
    args = {"rlr": (None, 1, 1.0)}.get(name, _selection_args(name, 1))
    with pytest.raises(RuntimeError, match=rf"{name}: rows must be on G's device {DEVICE}.*, got one on meta"):
        forward(_randn(5, 7, torch.float32), *args, torch.zeros(2, dtype=torch.int64, device="meta"))


# ---------------------------------------------------------------- client statistics, clipping

def _raw_client_stats(G, window=None, ref=None):
    start, length = (0, G.shape[1]) if window is None else window
    return RAW.client_stats(G, start, length, ref)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window", [None, (0, 1), (3, 100), (ROW_BLOCK, 1)])
def test_client_stats_matches_reference(dtype, window):
    G = _randn(5, ROW_BLOCK + 1, dtype)
    G[:, 10:20] = 0
    ref_vec = _randn(1, ROW_BLOCK + 1, dtype, seed=5)[0]
    norm, sign_frac, dot, ref_norm, ref_dist, flags = _raw_client_stats(G, window, ref_vec)
    expected = reference.client_stats(to_reference(G), window, to_reference(ref_vec))
    assert_close(norm, expected.norm, dtype)
    assert_close(sign_frac, expected.sign_frac, torch.float64)
    assert_close(dot, expected.dot, dtype)
    assert_close(ref_norm, expected.ref_norm.reshape(1), dtype)
    assert_close(ref_dist, expected.ref_dist, dtype)
    assert not flags.any()


@pytest.mark.parametrize("dtype", DTYPES)
def test_client_stats_outputs_are_float64_for_every_dtype(dtype):
    G = _randn(3, 50, dtype)
    with_ref = _raw_client_stats(G, (0, 50), G[0].clone())
    assert [t.dtype for t in with_ref] == [torch.float64] * 5 + [torch.bool]
    assert [tuple(t.shape) for t in with_ref[:5]] == [(3,), (3, 3), (3,), (1,), (3,)]
    without_ref = _raw_client_stats(G)
    assert [t.dtype for t in without_ref[:5]] == [torch.float64] * 5
    assert [t.numel() for t in without_ref[2:5]] == [0, 0, 0]


def test_client_stats_ref_dist_comes_from_differences():
    # ||G_i||^2 + ||ref||^2 - 2 G_i . ref would cancel to 0 (or below) for these nearly equal rows
    ref_vec = torch.full((64,), 1e8, dtype=torch.float64)
    G = ref_vec.repeat(2, 1)
    G[0, 3] += 1.0
    G = G.to(DEVICE)
    ref_dist = _raw_client_stats(G, None, ref_vec.to(DEVICE))[4]
    assert ref_dist.cpu().tolist() == [1.0, 0.0]


# float64 rows whose squares or products overflow (1e200) or underflow (1e-200, the smallest
# subnormal 5e-324), each with a reference vector of its kind (docs/nonfinite.md, "kScaled" sums).
EXTREME_FLOAT64_ROWS = {
    "huge": ([[1e200, 1e200, -1e200], [1e200] * 3, [-3e200, 0.0, 1e-300]], [1e108] * 3),
    "tiny": ([[1e-200] * 3, [5e-324] * 3, [0.0] * 3, [1e-200, -1e-200, 5e-324]], [2e-200, 1e-200, 0.0]),
    "cancelling": ([[1e200, 1e200], [1e200, -1e200]], [1e200, -1e200]),
}


@pytest.mark.parametrize("case", sorted(EXTREME_FLOAT64_ROWS))
def test_client_stats_float64_huge_and_tiny_rows_match_reference(case):
    rows, ref_values = EXTREME_FLOAT64_ROWS[case]
    G = torch.tensor(rows, dtype=torch.float64)
    ref_vec = torch.tensor(ref_values, dtype=torch.float64)
    norm, _, dot, ref_norm, ref_dist, flags = _raw_client_stats(G.to(DEVICE), None, ref_vec.to(DEVICE))
    expected = reference.client_stats(G, None, ref_vec)
    exact = dict(rtol=1e-12, atol=0.0)
    torch.testing.assert_close(norm.cpu(), expected.norm, **exact)
    torch.testing.assert_close(ref_dist.cpu(), expected.ref_dist, **exact)
    torch.testing.assert_close(ref_norm.cpu(), expected.ref_norm.reshape(1), **exact)
    torch.testing.assert_close(dot.cpu(), expected.dot, **exact)  # 1e308, and +-Inf where G_i . ref overflows
    assert torch.isfinite(norm).all() and torch.isfinite(ref_dist).all() and not flags.any()
    assert (norm[expected.norm > 0] > 0).all()


def test_client_stats_float64_cancelling_dot_is_exact_where_the_plain_sum_is_nan():
    # 1e200 * 1e200 - 1e200 * 1e200 is Inf - Inf in float64; scaled by 2^-600 it is exactly 0
    G = torch.tensor([[1e200, 1e200]], dtype=torch.float64).to(DEVICE)
    dot = _raw_client_stats(G, None, torch.tensor([1e200, -1e200], dtype=torch.float64).to(DEVICE))[2]
    assert dot.cpu().tolist() == [0.0]


def test_client_stats_float64_extreme_rows_across_blocks():
    d = ROW_BLOCK + 3
    G = torch.empty(3, d, dtype=torch.float64)
    G[0], G[1], G[2] = 1e200, 1e-200, 5e-324
    G[:, -1] = 0
    ref_vec = torch.full((d,), 3e-200, dtype=torch.float64)
    norm, _, _, _, ref_dist, _ = _raw_client_stats(G.to(DEVICE), None, ref_vec.to(DEVICE))
    expected = reference.client_stats(G, None, ref_vec)
    torch.testing.assert_close(norm.cpu(), expected.norm, rtol=1e-12, atol=0.0)
    torch.testing.assert_close(ref_dist.cpu(), expected.ref_dist, rtol=1e-12, atol=0.0)


def test_client_stats_norm_does_not_overflow_float32():
    G = torch.full((2, 4000), 1e30).to(DEVICE)  # sum of squares 4e63 overflows float32, the norm does not
    stats = robustagg.client_stats(G, backend=T)
    assert_close(stats.norm, torch.full((2,), 1e30 * 4000 ** 0.5, dtype=torch.float64), torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
def test_clip_rows_matches_reference_and_keeps_zero_rows(dtype):
    G = _randn(6, 777, dtype) * 3
    G[4] = 0
    bound = torch.tensor([1.0, 100.0, 0.0, 5.0, 1.0, 20.0])
    out = robustagg.clip_rows(G, bound, backend=T)
    assert torch.equal(out[4].cpu(), torch.zeros(777, dtype=dtype))
    assert_close(out, reference.clip_rows(to_reference(G), bound.double()), dtype)


def test_clip_rows_float64_huge_and_tiny_rows():
    G = torch.tensor([[1e200] * 4, [1e-200] * 4, [5e-324] * 4, [0.0] * 4, [3.0, 4.0, 0.0, 0.0], [1e-200] * 4],
                     dtype=torch.float64)
    bound = torch.tensor([1.0, 1e-201, 5e-324, 1.0, 2.5, 1.0], dtype=torch.float64)
    out, flags = RAW.clip_rows(G.to(DEVICE), bound.to(DEVICE))
    torch.testing.assert_close(out.cpu(), reference.clip_rows(G, bound), rtol=1e-12, atol=0.0)
    assert out[0].cpu().tolist() == [0.5] * 4 and out[1].cpu().tolist() == [5e-202] * 4
    assert torch.equal(out[5].cpu(), G[5]) and not flags.any()  # ||G_5|| = 2e-200 <= 1: kept exactly


def test_clip_rows_factor_below_the_float32_range_keeps_its_precision():
    # max_norm / ||G_0|| = 1e-3 / 6e38 is a float32 subnormal: rounded to float32 it would lose
    # ~3e-4 relative; in float64 the result is the correctly rounded float32
    G = torch.full((2, 4), 3e38).to(DEVICE)
    bound = torch.tensor([1e-3, 1e39])
    out, _ = RAW.clip_rows(G, bound.to(DEVICE))
    expected = reference.clip_rows(G.cpu(), bound)
    assert torch.equal(out.cpu(), expected)
    assert_close(out[0], torch.full((4,), 5e-4, dtype=torch.float64), torch.float32)
    assert torch.equal(out[1].cpu(), G[1].cpu())


# ---------------------------------------------------------------- top-k

def _distinct(d, dtype, seed=0):
    # distinct magnitudes, so the selected set is unambiguous (FlagGems' arange + randperm)
    g = torch.Generator().manual_seed(seed)
    signs = torch.where(torch.rand(d, generator=g) < 0.5, -1.0, 1.0)
    return ((torch.randperm(d, generator=g).double() + 1) * signs / d).to(dtype).to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [1, 7, FLAT_BLOCK - 1, FLAT_BLOCK, FLAT_BLOCK + 1])
def test_topk_abs_matches_reference(dtype, d):
    x = _distinct(d, dtype)
    for k in sorted({0, 1, d // 3, d - 1, d, d + 5}):
        idx, values = robustagg.topk_abs(x, k, backend=T)
        ref_idx, ref_values = reference.topk_abs(x.cpu(), k)
        assert torch.equal(idx.cpu(), ref_idx), k
        assert torch.equal(values.cpu(), ref_values), k


def test_topk_abs_all_equal_magnitudes_take_the_lowest_indices():
    x = torch.tensor([1.0, -1.0] * 700).to(DEVICE)
    idx, values = robustagg.topk_abs(x, 999, backend=T)
    assert torch.equal(idx.cpu(), torch.arange(999))
    assert torch.equal(values.cpu(), x[:999].cpu())


def test_topk_abs_ties_across_blocks_and_signed_zeros():
    d = 3 * FLAT_BLOCK
    x = torch.zeros(d)
    x[[5, FLAT_BLOCK + 3, d - 1]] = 4.0
    x[[7, FLAT_BLOCK, 2 * FLAT_BLOCK, 2 * FLAT_BLOCK + 9]] = -2.0
    x[::2] = torch.where(x[::2] == 0, torch.tensor(-0.0), x[::2])
    x = x.to(DEVICE)
    for k in [3, 5, 7, 10, 2000]:
        idx, values = robustagg.topk_abs(x, k, backend=T)
        ref_idx, ref_values = reference.topk_abs(x.cpu(), k)
        assert torch.equal(idx.cpu(), ref_idx), k
        assert torch.equal(values.cpu(), ref_values), k


def test_topk_abs_ties_across_histogram_programs():
    # one histogram program covers HISTOGRAM_STEPS blocks of keys: these ties span three programs
    d = 2 * HISTOGRAM_STEPS * FLAT_BLOCK + 1
    x = torch.zeros(d)
    x[torch.arange(0, d, 97)] = -7.0
    x[torch.arange(5, d, 1001)] = 7.0
    x[d - 1] = 9.0
    x = x.to(DEVICE)
    for k in [1, 20, 190]:
        idx, values = robustagg.topk_abs(x, k, backend=T)
        ref_idx, ref_values = reference.topk_abs(x.cpu(), k)
        assert torch.equal(idx.cpu(), ref_idx), k
        assert torch.equal(values.cpu(), ref_values), k


def test_topk_abs_huge_values():
    x = torch.tensor([1.0, -3e38, 3e38, 2.0, -1e-45]).to(DEVICE)
    idx, values = robustagg.topk_abs(x, 2, backend=T)
    assert idx.cpu().tolist() == [1, 2] and torch.equal(values, x[[1, 2]])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rho", [0.0, 0.9])
def test_topk_ef_step_matches_reference_over_steps(dtype, rho):
    d, k = FLAT_BLOCK + FLAT_BLOCK // 2, 37
    error, momentum = torch.zeros(d, dtype=dtype, device=DEVICE), torch.zeros(d, dtype=dtype, device=DEVICE)
    ref_error, ref_momentum = error.cpu().clone(), momentum.cpu().clone()
    for step in range(3):
        u = _randn(1, d, dtype, seed=step)[0]
        u[100:110] = 1.5  # ties at the top
        idx, values = robustagg.topk_ef_step(u, error, momentum, k, rho, backend=T)
        ref_idx, ref_values = reference.topk_ef_step(u.cpu(), ref_error, ref_momentum, k, rho)
        assert torch.equal(idx.cpu(), ref_idx)
        assert torch.equal(values.cpu(), ref_values)
        assert torch.equal(error.cpu(), ref_error)
        assert torch.equal(momentum.cpu(), ref_momentum)


@pytest.mark.parametrize("k", [0, 1500, 4000])
def test_topk_ef_step_k_edges(k):
    d = 1500
    u = _randn(1, d, torch.float32)[0]
    error, momentum = torch.ones(d, device=DEVICE), torch.ones(d, device=DEVICE)
    idx, values = robustagg.topk_ef_step(u, error, momentum, k, 0.5, backend=T)
    ref_error, ref_momentum = torch.ones(d), torch.ones(d)
    ref_idx, ref_values = reference.topk_ef_step(u.cpu(), ref_error, ref_momentum, k, 0.5)
    assert torch.equal(idx.cpu(), ref_idx) and torch.equal(values.cpu(), ref_values)
    assert torch.equal(error.cpu(), ref_error) and torch.equal(momentum.cpu(), ref_momentum)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_topk_ef_step_nonfinite_u_leaves_state_untouched(bad):
    u = _randn(1, 300, torch.float32)[0]
    u[17] = bad
    error, momentum = torch.ones(300, device=DEVICE), torch.full((300,), 2.0, device=DEVICE)
    idx, values, flag = torch.ops.robustagg_triton.topk_ef_step(u, error, momentum, 5, 0.9)
    assert idx.numel() == 0 and values.numel() == 0 and flag.cpu().tolist() == [True]
    assert torch.equal(error.cpu(), torch.ones(300)) and torch.equal(momentum.cpu(), torch.full((300,), 2.0))
    with pytest.raises(ValueError, match="u holds NaN or Inf"):
        robustagg.topk_ef_step(u, error, momentum, 5, 0.9, backend=T)


def test_topk_ef_step_float32_error_of_twice_3e38_saturates_at_flt_max():
    u = torch.tensor([3e38, 3e38, 1.0]).to(DEVICE)
    error, momentum = torch.zeros(3, device=DEVICE), torch.zeros(3, device=DEVICE)
    first, _, _ = RAW.topk_ef_step(u, error, momentum, 1, 0.0)  # the tie's lower index: 0
    second, sent, _ = RAW.topk_ef_step(u, error, momentum, 1, 0.0)  # index 1: 3e38 + 3e38
    assert first.cpu().tolist() == [0] and second.cpu().tolist() == [1]
    assert sent.cpu().tolist() == [FLT_MAX]
    assert torch.equal(error.cpu(), torch.tensor([3e38, 0.0, 2.0]))


@pytest.mark.parametrize("dtype,huge", [(torch.float32, 3e38), (torch.float16, 6e4), (torch.bfloat16, 3e38),
                                        (torch.float64, 1.7e308)])
@pytest.mark.parametrize("rho", [0.0, 0.9])
def test_topk_ef_step_state_saturates_at_the_largest_finite_value(dtype, huge, rho):
    # step 1 sends index 0; in step 2 indices 1 and 5 hold +-(error + u), beyond the dtype
    d = 8
    u = torch.zeros(d, dtype=dtype)
    u[:2] = huge
    u[5] = -huge
    u = u.to(DEVICE)
    error, momentum = torch.zeros(d, dtype=dtype, device=DEVICE), torch.zeros(d, dtype=dtype, device=DEVICE)
    ref_error, ref_momentum = error.cpu().clone(), momentum.cpu().clone()
    for _ in range(2):
        idx, values, _ = RAW.topk_ef_step(u, error, momentum, 1, rho)
        ref_idx, ref_values = reference.topk_ef_step(u.cpu(), ref_error, ref_momentum, 1, rho)
        assert torch.equal(idx.cpu(), ref_idx) and torch.equal(values.cpu(), ref_values)
        assert torch.equal(error.cpu(), ref_error) and torch.equal(momentum.cpu(), ref_momentum)
    limit = torch.finfo(dtype).max  # 65504 for float16
    assert idx.cpu().tolist() == [1] and values.cpu().tolist() == [limit]
    assert error[5] == -limit and torch.isfinite(error).all() and torch.isfinite(momentum).all()
    if rho > 0:
        assert momentum[5] == -limit  # 0.9 * momentum + u is beyond the dtype too


# ---------------------------------------------------------------- max-pool

SHAPES = [(4, 3, 3, 3), (4,), (5, 7), (), (3, 2), (2, 2), (2, 5, 2), (6, 9)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("restore", [False, True])
@pytest.mark.parametrize("kernel", [1, 2, 3])
def test_maxpool_matches_reference_per_parameter_layout(dtype, restore, kernel):
    layout = Layout.from_shapes(SHAPES)
    G = torch.randint(-3, 4, (3, layout.d)).to(dtype).to(DEVICE)  # small integers: many tied windows
    out = robustagg.maxpool_amplify(G, layout, kernel, restore, backend=T)
    assert torch.equal(out.cpu(), reference.maxpool_amplify(G.cpu(), layout, kernel, restore))


@pytest.mark.parametrize("restore", [False, True])
@pytest.mark.parametrize("width,skip_tail", [(6, 5), (7, 0), (1, 3)])
def test_maxpool_flat_layout(restore, width, skip_tail):
    G = _randn(4, 200, torch.float32)
    layout = Layout.flat(width, skip_tail)
    out = robustagg.maxpool_amplify(G, layout, 2 if width > 1 else 1, restore, backend=T)
    assert torch.equal(out.cpu(), reference.maxpool_amplify(G.cpu(), layout, 2 if width > 1 else 1, restore))


def test_maxpool_restore_keeps_first_argmax_of_tied_window():
    G = torch.tensor([[5.0, 5.0, 1.0, 5.0, 5.0, 0.0]]).to(DEVICE)  # one (2, 3) matrix, kernel 2
    out = robustagg.maxpool_amplify(G, Layout.from_shapes([(2, 3)]), 2, restore=True, backend=T)
    assert out.cpu().tolist() == [[5.0, 0.0, 0.0, 0.0, 0.0, 0.0]]


def test_maxpool_segment_smaller_than_kernel_pools_to_nothing():
    layout = Layout.from_shapes([(1, 1), (3,), (2, 2)])
    G = torch.tensor([[9.0, 1.0, 2.0, 3.0, 4.0, -1.0, 6.0, 0.5]]).to(DEVICE)
    out = robustagg.maxpool_amplify(G, layout, 2, backend=T)
    assert out.cpu().tolist() == [[1.0, 2.0, 3.0, 6.0]]
    restored = robustagg.maxpool_amplify(G, layout, 2, restore=True, backend=T)
    assert restored.cpu().tolist() == [[0.0, 1.0, 2.0, 3.0, 0.0, 0.0, 6.0, 0.0]]


@pytest.mark.parametrize("restore", [False, True])
def test_maxpool_flags_nan_in_dropped_remainder_and_uncovered_tail(restore):
    layout = Layout.flat(4, skip_tail=3)
    G = _randn(3, 23, torch.float32)
    G[0, 4 * 4 + 3] = float("nan")  # last (partial) row: dropped by floor mode
    G[2, 22] = float("inf")         # the skipped tail
    with pytest.raises(NonFiniteUpdateError) as info:
        robustagg.maxpool_amplify(G, layout, 2, restore, backend=T)
    assert list(info.value.clients) == [0, 2]


@pytest.mark.parametrize("restore", [False, True])
def test_maxpool_flags_minus_inf_that_is_not_the_window_max(restore):
    layout = Layout.from_shapes([(4, 6)])
    G = _randn(3, 24, torch.float32)
    G[1, 7] = float("-inf")  # inside the window at (0, 0); its max is finite
    out, flags = RAW.maxpool_amplify(G, layout.segment_table(24, 2, restore), 2, restore,
                                     24 if restore else layout.pooled_width(24, 2))
    assert flags.cpu().tolist() == [False, True, False]
    assert torch.isfinite(out).all()


_HUGE_KERNEL_SCRIPT = """
import os, sys, time
os.environ.setdefault("TRITON_INTERPRET", "1")
import torch
from robustagg import _triton_ops  # registers torch.ops.robustagg_triton
from robustagg.layout import Layout
device = torch.device(sys.argv[1])
G = torch.randn(7, 37, device=device)
start = time.perf_counter()
for kernel in (2 ** 40, 9):
    table = Layout.flat(4).segment_table(37, kernel, True)
    out, flags = torch.ops.robustagg_triton.maxpool_amplify(G, table, kernel, True, 37)
    assert torch.equal(out.cpu(), torch.zeros(7, 37)) and not flags.any(), kernel
print("seconds", time.perf_counter() - start)
"""


def test_maxpool_restore_with_a_kernel_larger_than_every_segment_returns_promptly():
    # 9 rows of 4 values hold no 2^40 x 2^40 (nor 9 x 9) window: all zero-fill, no loop over the
    # kernel (the per-element window loop never returned). A subprocess, so that a hang fails.
    result = subprocess.run([sys.executable, "-c", _HUGE_KERNEL_SCRIPT, str(DEVICE)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert float(result.stdout.split("seconds")[1]) < 30


@pytest.mark.parametrize("segment, kernel, restore, out_width, match", [
    ((0, 2, 3, 1, 0), 0, False, 7, r"maxpool_amplify: kernel=0 is out of range; allowed >= 1"),
    ((4, 2, 2, 1, 0), 2, False, 7, r"maxpool_amplify: segment 0 \(offset 4, rows 2, cols 2\) does not fit in d=7"),
    ((0, 2, 2 ** 62, 0, 0), 2, False, 7,
     r"segment 0 \(offset 0, rows 2, cols 4611686018427387904\) does not fit in d=7"),
    ((0, 2, 2, 7, 0), 1, False, 4, r"segment 0 has pooled=7"),
    ((0, 2, 3, 0, 2), 2, False, 7,
     r"maxpool_amplify: segment 0 writes 6 values at output offset 2, outside the output row of width 7"),
    ((0, 2, 3, 1, 1), 2, True, 7, r"with restore=True segment 0 must write where it reads"),
    ((0, 2, 2, 1, 0), 2, False, 2 ** 62, r"out_width=4611686018427387904 is out of range"),
])
def test_maxpool_raw_op_rejects_hostile_segment_tables(segment, kernel, restore, out_width, match):
    # the work table's addresses and sizes come from the segment table: the same checks (and
    # messages) as csrc/checks.h, before anything is allocated or launched
    with pytest.raises(RuntimeError, match=match):
        RAW.maxpool_amplify(_randn(5, 7, torch.float32), list(segment), kernel, restore, out_width)


@pytest.mark.parametrize("rows", [None, [0, 2]])
def test_rlr_raw_op_rejects_weights_that_are_not_one_per_row_read(rows):
    G = _randn(5, 7, torch.float32)
    selection = None if rows is None else torch.tensor(rows, device=DEVICE)
    m = 5 if rows is None else 2
    with pytest.raises(RuntimeError, match=rf"rlr: weights must have shape \({m},\), one per row the op reads"):
        RAW.rlr(G, torch.ones(m + 1, device=DEVICE), 1, 1.0, selection)


def test_maxpool_raw_op_rejects_a_segment_table_of_partial_segments():
    with pytest.raises(RuntimeError, match=r"segments must hold five ints per segment, got 6"):
        RAW.maxpool_amplify(_randn(5, 7, torch.float32), [0, 2, 2, 1, 0, 0], 2, False, 1)


# ---------------------------------------------------------------- pairwise

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", sorted({1, 2, 17, 33, PAIR_BLOCK + 1}))
def test_pairwise_matches_reference(dtype, n):
    G = _randn(n, 97, dtype, seed=n)
    D, D_flags = RAW.pairwise_sqdist(G)
    C, C_flags = RAW.pairwise_cosine(G)
    assert D.dtype == C.dtype == torch.float64  # for every input dtype
    assert_close(D, reference.pairwise_sqdist(to_reference(G)), dtype)
    assert_close(C, reference.pairwise_cosine(to_reference(G)), dtype)
    assert not D_flags.any() and not C_flags.any()
    assert_close(robustagg.pairwise_cosine(G, backend=T), reference.pairwise_cosine(to_reference(G)), dtype)


def _extreme_float64_rows():
    """Rows of 1e300 (squares overflow), 1e-300 (squares underflow), zeros, and ordinary rows."""
    G = _randn(7, 40, torch.float64, seed=11).cpu()
    G[0] *= 1e300
    G[1] *= 1e-300
    G[2] = 0
    G[3] = G[1]           # identical tiny rows: their distance underflows to 0 anyway
    G[4] = -G[0]
    G[5, :20] = 1e-300    # a row of mixed scale
    return G


def test_pairwise_float64_huge_tiny_and_zero_rows_match_reference():
    G = _extreme_float64_rows()
    D, _ = RAW.pairwise_sqdist(G.to(DEVICE))
    C, flags = RAW.pairwise_cosine(G.to(DEVICE))
    torch.testing.assert_close(D.cpu(), reference.pairwise_sqdist(G), rtol=1e-12, atol=0.0)
    torch.testing.assert_close(C.cpu(), reference.pairwise_cosine(G), rtol=1e-12, atol=1e-15)
    assert torch.isfinite(C).all() and not flags.any()
    assert C[0, 4] == -1 and C[1, 3] == 1 and C.diagonal().cpu().tolist() == [1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0]
    assert C[2].abs().sum() == 0 and torch.equal(C, C.T)


def test_pairwise_float64_rows_that_are_all_safe_keep_one_launch_bits():
    # safe rows keep the scale 1 in the rescaled launch, so adding an unsafe row does not change them
    G = _randn(6, 40, torch.float64, seed=2)
    C_safe, _ = RAW.pairwise_cosine(G)
    G_with_unsafe = torch.cat([G, torch.full((1, 40), 1e-300, dtype=torch.float64, device=DEVICE)])
    C, _ = RAW.pairwise_cosine(G_with_unsafe)
    assert torch.equal(C[:6, :6], C_safe)


def test_pairwise_identical_rows_exact_and_symmetric():
    G = _randn(20, 301, torch.float32)
    G[5] = G[11]
    G[17] = 0
    D = robustagg.pairwise_sqdist(G, backend=T)
    C = robustagg.pairwise_cosine(G, backend=T)
    assert D[5, 11] == 0 and D[11, 5] == 0 and C[5, 11] == 1 and C[11, 5] == 1
    assert torch.equal(D, D.T) and torch.equal(C, C.T)
    assert torch.equal(D.diagonal().cpu(), torch.zeros(20))
    assert C[17].abs().sum() == 0 and C[:, 17].abs().sum() == 0
    assert torch.equal(C.diagonal().cpu(), torch.tensor([1.0] * 17 + [0.0] + [1.0] * 2))


def test_pairwise_huge_values_do_not_overflow():
    G = torch.full((3, 50), 1e30)
    G[1] = -1e30
    G = G.to(DEVICE)
    C = robustagg.pairwise_cosine(G, backend=T).cpu()
    assert C.tolist() == [[1.0, -1.0, 1.0], [-1.0, 1.0, -1.0], [1.0, -1.0, 1.0]]


# ---------------------------------------------------------------- layouts, determinism

def test_non_contiguous_inputs():
    base = _randn(40, 20, torch.float32)
    G = base.T  # (20, 40), column-major
    assert not G.is_contiguous()
    assert_close(robustagg.median(G, backend=T), reference.median(to_reference(G)), torch.float32)
    assert torch.equal(robustagg.sign_sum(G, backend=T).cpu(), reference.sign_sum(G.cpu()))
    assert_close(robustagg.client_stats(G, backend=T).norm, reference.client_stats(to_reference(G)).norm,
                 torch.float32)


def test_every_op_is_bitwise_deterministic():
    G = _randn(20, 1100, torch.float32)
    layout = Layout.flat(30)
    runs = []
    for _ in range(2):
        e, m = torch.zeros(1100, device=DEVICE), torch.zeros(1100, device=DEVICE)
        runs.append([
            robustagg.sign_sum(G, backend=T), robustagg.median(G, backend=T),
            robustagg.rlr(G, 5, backend=T), robustagg.client_stats(G, (3, 40), G[0], backend=T).norm,
            robustagg.clip_rows(G, 1.0, backend=T), *robustagg.topk_abs(G[3], 50, backend=T),
            *robustagg.topk_ef_step(G[4], e, m, 50, 0.9, backend=T), e, m,
            robustagg.maxpool_amplify(G, layout, 2, backend=T), robustagg.pairwise_sqdist(G, backend=T),
            robustagg.pairwise_cosine(G, backend=T),
        ])
    for first, second in zip(*runs):
        assert torch.equal(first, second)


# ---------------------------------------------------------------- compile for real GPUs (no GPU needed)

class _LaunchRecorder:
    """Stands in for ``wrap_triton``: records (kernel, args, kwargs) instead of launching."""

    def __init__(self):
        self.calls = []

    def __call__(self, kernel):
        recorder = self

        class _Grid:
            def __getitem__(self, grid):
                return lambda *args, **kwargs: recorder.calls.append((kernel, args, kwargs))

        return _Grid()


def _record_launches(dtype):
    """Every kernel launch of every op on small CPU tensors of ``dtype`` (nothing runs)."""
    from robustagg import _triton_ops  # noqa: F401  (makes robustagg.triton_kernels importable)
    from robustagg.triton_kernels import client_stats, maxpool, order_stats, pairwise, sign_votes, topk
    rec = _LaunchRecorder()
    G, v = torch.zeros(20, 300, dtype=dtype), torch.zeros(3000, dtype=dtype)
    sign_votes.sign_sum_forward(G, launch=rec)
    sign_votes.rlr_forward(G, torch.ones(20), 3, 1.0, launch=rec)
    order_stats.order_mean_forward(G, 1, 5, launch=rec)
    big = torch.zeros(300, 5, dtype=dtype)
    order_stats.invariant_forward(big, 1, 5, 3, launch=rec)
    order_stats.closest_to_median_mean_forward(G, 3, launch=rec)
    order_stats.closest_to_median_mean_forward(big, 3, launch=rec)
    # a row selection: the kernels' HAS_ROWS variants, on both sides of MAX_SORT_N
    rows, big_rows = torch.tensor([3, 0, 3]), torch.arange(299, -1, -1)
    sign_votes.sign_sum_forward(G, rows, launch=rec)
    sign_votes.rlr_forward(G, torch.ones(3), 3, 1.0, rows, launch=rec)
    order_stats.order_mean_forward(G, 1, 2, rows, launch=rec)
    order_stats.invariant_forward(big, 1, 5, 3, big_rows, launch=rec)
    order_stats.closest_to_median_mean_forward(G, 2, rows, launch=rec)
    order_stats.closest_to_median_mean_forward(big, 3, big_rows, launch=rec)
    client_stats.client_stats_forward(G, 0, 10, v[:300], rec)
    client_stats.clip_rows_forward(G, torch.ones(20), rec)
    topk.topk_abs_forward(v, 10, rec)
    topk.topk_ef_step_forward(v, v.clone(), v.clone(), 10, 0.9, rec)
    layout = Layout.from_shapes([(4, 5), (4,)])
    maxpool.maxpool_amplify_forward(torch.zeros(2, 24, dtype=dtype), layout.segment_table(24, 2, False), 2, False, 8,
                                    rec)
    pairwise.pairwise_cosine_forward(G, rec)
    return rec.calls


_TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
                 torch.int32: "i32", torch.int64: "i64", torch.int8: "i8", torch.bool: "i1"}


def _signature(kernel, args, kwargs):
    signature, constants = {}, {}
    for i, (name, param) in enumerate(zip(kernel.arg_names, kernel.params)):
        if param.is_constexpr:
            signature[name], constants[name] = "constexpr", kwargs[name]
            continue
        value = args[i]
        if isinstance(value, torch.Tensor):
            signature[name] = "*" + _TRITON_TYPES[value.dtype]
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            signature[name] = "i32" if -2 ** 31 <= value < 2 ** 31 else "i64"
        else:
            signature[name] = "fp32"
    return signature, constants


def compile_every_kernel(capability: int, dtypes=(torch.float32, torch.bfloat16, torch.float64)):
    """Compile every launch of every op to a cubin for sm_<capability> (needs TRITON_INTERPRET=0)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    compiled = set()
    for dtype in dtypes:
        for kernel, args, kwargs in _record_launches(dtype):
            signature, constants = _signature(kernel, args, kwargs)
            key = (kernel.fn.__name__, tuple(sorted(signature.items())), tuple(sorted(constants.items())))
            if key in compiled:
                continue
            binary = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constants),
                                    target=GPUTarget("cuda", capability, 32),
                                    options={key: kwargs[key] for key in ("num_warps", "enable_fp_fusion")
                                             if key in kwargs})
            assert binary.asm["cubin"], kernel.fn.__name__
            compiled.add(key)
    print("compiled:", " ".join(sorted({key[0] for key in compiled})))


@pytest.mark.skipif(DEVICE.type == "cuda", reason="on a GPU the kernels are compiled and run by the other tests")
@pytest.mark.parametrize("capability", [80, 90])
def test_every_kernel_compiles_for_the_gpu(capability):
    # The interpreter accepts code the GPU compiler rejects; compile every kernel variant to a cubin
    # (float64 too: its scaled sums and the rescaled pairwise launch are float64-only code).
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    code = ("import sys; sys.path.insert(0, 'tests'); import test_triton; "
            f"test_triton.compile_every_kernel({capability})")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    names = result.stdout.split("compiled:")[1].split()
    assert names == sorted(ALL_KERNELS), result.stdout
