"""What only the Triton backend has: its registration, its block sizes and paths, its launchers.

The numerics of every op (against robustagg.reference, in every dtype, with ties, signed zeros,
huge and tiny finite values, non-finite rows under each policy, row selections) are the family
tests' (tests/test_sign_votes.py, test_order_stats.py, test_closest_to_median_mean.py,
test_client_stats.py, test_topk.py, test_maxpool.py, test_pairwise.py, test_api.py,
test_adversarial.py), which run on backend="triton" like on every other backend
(conftest.backends_for). This file keeps what is specific to the Triton implementation:

* the registration as torch.ops.robustagg_triton.*, driven by the op table
  (robustagg/_registry.py): schemas, mutated arguments, opcheck, also with row selections;
* the block and tile boundaries of kernels/settings.py (the one-tile sort, row blocks, flat
  blocks and the histogram programs of the top-k radix select), the path chosen by n and by the
  selected row count (the one-tile sort up to MAX_SORT_N rows, the radix select beyond), exact
  results of the kernels' tree sums and of the rescaled pairwise launch;
* the launchers' checks of their raw arguments (row selections, weights, segment tables) and
  their tracing on fake tensors;
* the compilation of every kernel for sm_80 and sm_90.

Without a GPU these run under TRITON_INTERPRET=1 on CPU tensors (conftest sets it), which is slow:
shapes stay small, and each case targets one kernel path.
"""
import importlib
import os
import subprocess
import sys

import pytest
import torch

import robustagg
from robustagg import reference
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

RAW = torch.ops.robustagg_triton  # the raw ops, whose outputs do not depend on robustagg.ops

try:  # block sizes of the active mode (interpreter or GPU), for the boundary cases below
    from robustagg import _triton_ops  # noqa: F401  (makes robustagg.triton_kernels importable)
    from robustagg.triton_kernels import settings as _settings
    from robustagg.triton_kernels.topk import HISTOGRAM_STEPS
    COLUMN_BLOCK = _settings.column_settings(1)[1]
    SORT_BLOCK_N5 = _settings.sort_settings(5)[1]
    ROW_BLOCK = _settings.row_settings(1 << 20)[1]
    FLAT_BLOCK = _settings.flat_settings()[0]
except ImportError:  # no triton: every test below is skipped
    COLUMN_BLOCK, SORT_BLOCK_N5, ROW_BLOCK, FLAT_BLOCK, HISTOGRAM_STEPS = 512, 256, 1024, 1024, 8
# the ops with a Triton launcher, and those of them that take a row selection (rows=)
ALL_OPS = sorted(name for name, op in RAW_OPS.items() if op.triton_launcher)
SELECTING_OPS = sorted(name for name in ALL_OPS if "rows" in RAW_OPS[name].signature().parameters)


def _ops():
    from robustagg import _triton_ops
    return _triton_ops


def _launcher(name):
    """The op's launcher in robustagg.triton_kernels, as the op table names it."""
    module, function = RAW_OPS[name].triton_launcher.split(".")
    return getattr(importlib.import_module(f"robustagg.triton_kernels.{module}"), function)


def _kernels():
    """The names of every kernel, ``_<name>_kernel``, in the launchers' modules."""
    modules = {sys.modules[_launcher(name).__module__] for name in ALL_OPS}
    return sorted({attr for module in modules for attr in vars(module)
                   if attr.startswith("_") and attr.endswith("_kernel")})


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


@pytest.mark.parametrize("name", ALL_OPS)
def test_every_op_declares_the_mutations_of_the_table(name):
    schema = getattr(RAW, name).default._schema
    mutated = [a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write]
    assert mutated == list(RAW_OPS[name].mutates)  # ["error", "momentum"] for topk_ef_step


@pytest.mark.parametrize("name", ALL_OPS)
def test_opcheck(name):
    torch.library.opcheck(_ops().OPS[name], RAW_OPS[name].sample(DEVICE))


# ---------------------------------------------------------------- order statistics

@pytest.mark.parametrize("d", [1, 7, SORT_BLOCK_N5 - 1, SORT_BLOCK_N5, SORT_BLOCK_N5 + 1])
def test_order_mean_tile_boundaries(d):
    # n = 5 pads to 8 rows and a tile of SORT_BLOCK_N5 columns (kernels/settings.py sort_settings)
    G = _randn(5, d, torch.float32)
    assert_close(robustagg.order_mean(G, 1, 4, backend="triton"), reference.order_mean(to_reference(G), 1, 4),
                 torch.float32)


def _opposite_huge_rows(n):
    """n/2 rows of -3e38 over n/2 rows of 3e38: partial sums reach -Inf and +Inf, and a tree sum
    adds them to NaN (it does for these n, in the interpreter as well); the exact mean is 0."""
    return torch.tensor([-3e38] * (n // 2) + [3e38] * (n // 2))[:, None].repeat(1, 3).to(DEVICE)


@pytest.mark.parametrize("n", [8, 300])
def test_order_mean_sum_that_overflows_to_nan_in_a_tree_is_rescued(n):
    # on both paths the kernels redo the sum scaled by a power of two; the family test
    # (test_adversarial.py) asks every backend for a finite mean, the Triton kernels give it exactly
    out, _ = RAW.order_mean(_opposite_huge_rows(n), 0, n)
    assert torch.equal(out.cpu(), torch.zeros(3))  # the rescaled values are multiples of 3e38 / 2^m: exact


# ---------------------------------------------------------------- row selections

TORCH_RAW = torch.ops.robustagg_torch
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


# ---------------------------------------------------------------- the raw ops' argument checks

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
    args = {"rlr": (None, 1, 1.0)}.get(name, _selection_args(name, 1))
    with pytest.raises(RuntimeError, match=rf"{name}: rows must be on G's device {DEVICE}.*, got one on meta"):
        _launcher(name)(_randn(5, 7, torch.float32), *args, torch.zeros(2, dtype=torch.int64, device="meta"))


@pytest.mark.parametrize("rows", [None, [0, 2]])
def test_rlr_raw_op_rejects_weights_that_are_not_one_per_row_read(rows):
    G = _randn(5, 7, torch.float32)
    selection = None if rows is None else torch.tensor(rows, device=DEVICE)
    m = 5 if rows is None else 2
    with pytest.raises(RuntimeError, match=rf"rlr: weights must have shape \({m},\), one per row the op reads"):
        RAW.rlr(G, torch.ones(m + 1, device=DEVICE), 1, 1.0, selection)


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


def test_maxpool_raw_op_rejects_a_segment_table_of_partial_segments():
    with pytest.raises(RuntimeError, match=r"segments must hold five ints per segment, got 6"):
        RAW.maxpool_amplify(_randn(5, 7, torch.float32), [0, 2, 2, 1, 0, 0], 2, False, 1)


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
    # kernel (the per-element window loop never returned). A subprocess, so that a hang fails. The
    # public API refuses a kernel of 2^40 (test_adversarial.py); the raw op takes it.
    result = subprocess.run([sys.executable, "-c", _HUGE_KERNEL_SCRIPT, str(DEVICE)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert float(result.stdout.split("seconds")[1]) < 30


# ---------------------------------------------------------------- client statistics

def _raw_client_stats(G, window=None, ref=None):
    start, length = (0, G.shape[1]) if window is None else window
    return RAW.client_stats(G, start, length, ref)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window", [None, (0, 1), (3, 100), (ROW_BLOCK, 1)])
def test_client_stats_matches_reference(dtype, window):
    # a row of ROW_BLOCK + 1 values: two row blocks, and windows on both sides of the boundary
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
    # the launcher's outputs, with and without ref, have the fake implementation's shapes and dtypes
    G = _randn(3, 50, dtype)
    with_ref = _raw_client_stats(G, (0, 50), G[0].clone())
    assert [t.dtype for t in with_ref] == [torch.float64] * 5 + [torch.bool]
    assert [tuple(t.shape) for t in with_ref[:5]] == [(3,), (3, 3), (3,), (1,), (3,)]
    without_ref = _raw_client_stats(G)
    assert [t.dtype for t in without_ref[:5]] == [torch.float64] * 5
    assert [t.numel() for t in without_ref[2:5]] == [0, 0, 0]


def test_client_stats_float64_extreme_rows_across_blocks():
    # the scaled float64 sums (test_client_stats.py) carried from one row block to the next
    d = ROW_BLOCK + 3
    G = torch.empty(3, d, dtype=torch.float64)
    G[0], G[1], G[2] = 1e200, 1e-200, 5e-324
    G[:, -1] = 0
    ref_vec = torch.full((d,), 3e-200, dtype=torch.float64)
    norm, _, _, _, ref_dist, _ = _raw_client_stats(G.to(DEVICE), None, ref_vec.to(DEVICE))
    expected = reference.client_stats(G, None, ref_vec)
    torch.testing.assert_close(norm.cpu(), expected.norm, rtol=1e-12, atol=0.0)
    torch.testing.assert_close(ref_dist.cpu(), expected.ref_dist, rtol=1e-12, atol=0.0)


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
        idx, values = robustagg.topk_abs(x, k, backend="triton")
        ref_idx, ref_values = reference.topk_abs(x.cpu(), k)
        assert torch.equal(idx.cpu(), ref_idx), k
        assert torch.equal(values.cpu(), ref_values), k


def test_topk_abs_ties_across_blocks_and_signed_zeros():
    d = 3 * FLAT_BLOCK
    x = torch.zeros(d)
    x[[5, FLAT_BLOCK + 3, d - 1]] = 4.0
    x[[7, FLAT_BLOCK, 2 * FLAT_BLOCK, 2 * FLAT_BLOCK + 9]] = -2.0
    x[::2] = torch.where(x[::2] == 0, torch.tensor(-0.0), x[::2])
    x = x.to(DEVICE)
    for k in [3, 5, 7, 10, 2000]:
        idx, values = robustagg.topk_abs(x, k, backend="triton")
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
        idx, values = robustagg.topk_abs(x, k, backend="triton")
        ref_idx, ref_values = reference.topk_abs(x.cpu(), k)
        assert torch.equal(idx.cpu(), ref_idx), k
        assert torch.equal(values.cpu(), ref_values), k


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rho", [0.0, 0.9])
def test_topk_ef_step_matches_reference_over_steps(dtype, rho):
    # one and a half flat blocks: the selection and the state update cross a block boundary
    d, k = FLAT_BLOCK + FLAT_BLOCK // 2, 37
    error, momentum = torch.zeros(d, dtype=dtype, device=DEVICE), torch.zeros(d, dtype=dtype, device=DEVICE)
    ref_error, ref_momentum = error.cpu().clone(), momentum.cpu().clone()
    for step in range(3):
        u = _randn(1, d, dtype, seed=step)[0]
        u[100:110] = 1.5  # ties at the top
        idx, values = robustagg.topk_ef_step(u, error, momentum, k, rho, backend="triton")
        ref_idx, ref_values = reference.topk_ef_step(u.cpu(), ref_error, ref_momentum, k, rho)
        assert torch.equal(idx.cpu(), ref_idx)
        assert torch.equal(values.cpu(), ref_values)
        assert torch.equal(error.cpu(), ref_error)
        assert torch.equal(momentum.cpu(), ref_momentum)


# ---------------------------------------------------------------- pairwise

def test_pairwise_float64_rows_that_are_all_safe_keep_one_launch_bits():
    # safe rows keep the scale 1 in the rescaled launch, so adding an unsafe row does not change them
    G = _randn(6, 40, torch.float64, seed=2)
    C_safe, _ = RAW.pairwise_cosine(G)
    G_with_unsafe = torch.cat([G, torch.full((1, 40), 1e-300, dtype=torch.float64, device=DEVICE)])
    C, _ = RAW.pairwise_cosine(G_with_unsafe)
    assert torch.equal(C[:6, :6], C_safe)


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
    """Every kernel launch of every op on CPU tensors of ones in ``dtype`` (nothing runs; ones pass
    every argument check, all-zero rlr weights would not): the op
    table's sample call of each op, then the ops that take rows on both sides of MAX_SORT_N (the
    one-tile sort and the radix select), of an odd and an even n, without and with a selection."""
    rec = _LaunchRecorder()
    for name in ALL_OPS:
        args = [torch.ones_like(a, dtype=dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                for a in RAW_OPS[name].sample(torch.device("cpu"))]
        _launcher(name)(*args, launch=rec)
    G, big = torch.zeros(20, 300, dtype=dtype), torch.zeros(300, 5, dtype=dtype)
    rows, big_rows = torch.tensor([3, 0, 3]), torch.arange(299, -1, -1)
    for name in SELECTING_OPS:
        for X, selection in [(G, None), (big, None), (G, rows), (big, big_rows)]:
            m = X.shape[0] if selection is None else selection.shape[0]
            _launcher(name)(X, *_selection_args(name, m), selection, launch=rec)
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
    assert names == _kernels(), result.stdout
