"""The public API's contract: argument errors, the non-finite policy machinery and backend selection
(docs/backends.md, docs/nonfinite.md, docs/ops.md). Per-op numerics are tested in the per-family test files."""
import math

import pytest
import torch

import robustagg
from robustagg import BackendUnavailableError, NonFiniteUpdateError, _backend, ops, reference
from robustagg._registry import RAW_OPS
from robustagg.layout import Layout

from conftest import DEVICE


def _G(n=6, d=11, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64).to(DEVICE, dtype)


# ---------------------------------------------------------------- G itself

@pytest.mark.parametrize("bad, exc, match", [
    (torch.zeros(5), ValueError, r"shape \(5,\); it must be 2-D"),
    (torch.zeros(0, 4), ValueError, "n=0 rows"),
    (torch.zeros(3, 0), ValueError, "d=0 columns"),
    (torch.zeros(3, 4, dtype=torch.int32), TypeError, "dtype torch.int32; supported dtypes"),
    ([[1.0, 2.0]], TypeError, "G must be a torch.Tensor, got list"),
])
def test_bad_G_is_rejected_with_its_shape_or_type(bad, exc, match):
    with pytest.raises(exc, match=match):
        robustagg.median(bad)


def test_noncontiguous_G_is_accepted():
    G = _G(5, 12)
    assert torch.equal(robustagg.median(G.T.contiguous().T, backend="torch"), robustagg.median(G, backend="torch"))


# ---------------------------------------------------------------- parameter ranges

def test_trim_too_large_names_value_and_range():
    with pytest.raises(ValueError, match=r"trim=3 is out of range; allowed in \[0, 2\].*n=6"):
        robustagg.trimmed_mean(_G(6), 3)


@pytest.mark.parametrize("lo, hi, match", [
    (-1, 3, r"lo=-1 .*allowed in \[0, 5\]"),
    (3, 3, r"hi=3 .*allowed in \[4, 6\]"),
    (0, 7, r"hi=7 .*allowed in \[1, 6\]"),
])
def test_order_bounds_name_value_and_range(lo, hi, match):
    with pytest.raises(ValueError, match=match):
        robustagg.order_mean(_G(6), lo, hi)


def test_non_int_trim_is_a_type_error():
    with pytest.raises(TypeError, match="trim must be an int, got 1.5"):
        robustagg.trimmed_mean(_G(), 1.5)


@pytest.mark.parametrize("tau", [-0.1, 1.5, math.nan])
def test_tau_outside_unit_interval_is_rejected(tau):
    with pytest.raises(ValueError, match=r"tau=.*allowed in \[0.0, 1.0\]"):
        robustagg.invariant(_G(), tau, 1)


def test_theta_outside_vote_range_is_rejected():
    with pytest.raises(ValueError, match=r"theta=7 .*allowed in \[0, 6\]"):
        robustagg.rlr(_G(6), 7)


@pytest.mark.parametrize("weights, match", [
    (torch.ones(5), r"weights has shape \(5,\); it must be \(6,\)"),
    (torch.tensor([1.0, -1, 1, 1, 1, 1]), r"rlr: weights must be finite, >= 0 and not all 0; got min=-1.0"),
    (torch.zeros(6), r"rlr: weights must be finite, >= 0 and not all 0; got min=0.0 max=0.0"),
    (torch.tensor([1.0, float("nan"), 1, 1, 1, 1]), r"rlr: weights must be finite"),
])
def test_bad_weights_are_rejected(weights, match):
    with pytest.raises(ValueError, match=match):
        robustagg.rlr(_G(6), 3, weights=weights)


@pytest.mark.parametrize("window, exc, match", [
    ((11, 1), ValueError, r"window start=11 .*\[0, 10\]"),
    ((4, 0), ValueError, r"window length=0 .*\[1, 7\]"),
    ((4, 8), ValueError, r"window length=8 .*\[1, 7\]"),
    (5, TypeError, "window must be a \\(start, length\\) tuple"),
])
def test_bad_window_is_rejected(window, exc, match):
    with pytest.raises(exc, match=match):
        robustagg.client_stats(_G(), window)


def test_ref_of_wrong_length_or_nonfinite_is_rejected():
    with pytest.raises(ValueError, match="ref has length 3; it must have d=11"):
        robustagg.client_stats(_G(), ref=torch.zeros(3, device=DEVICE))
    ref = torch.zeros(11, device=DEVICE)
    ref[4] = math.inf
    with pytest.raises(ValueError, match="ref holds NaN or Inf"):
        robustagg.client_stats(_G(), ref=ref)


@pytest.mark.parametrize("max_norm, match", [(-1.0, r"max_norm=-1.0 is out of range; allowed in \[0.0, 3.40"),
                                             (math.inf, "max_norm=inf")])
def test_bad_scalar_clip_bound_is_rejected(max_norm, match):
    with pytest.raises(ValueError, match=match):
        robustagg.clip_rows(_G(), max_norm)


def test_per_row_clip_bound_must_have_n_entries():
    with pytest.raises(ValueError, match=r"max_norm has shape \(2,\); it must be a scalar or \(6,\)"):
        robustagg.clip_rows(_G(6), torch.ones(2))


def test_topk_arguments_are_checked():
    u = torch.randn(10, device=DEVICE)
    with pytest.raises(ValueError, match=r"k=-1 .*>= 0"):
        robustagg.topk_abs(u, -1)
    with pytest.raises(ValueError, match="error is \\(9,\\).*must match u"):
        robustagg.topk_ef_step(u, torch.zeros(9, device=DEVICE), torch.zeros(10, device=DEVICE), 2, 0.9)
    with pytest.raises(ValueError, match=r"rho=-0.5 is out of range; allowed in \[0.0, 3.40"):
        robustagg.topk_ef_step(u, torch.zeros_like(u), torch.zeros_like(u), 2, -0.5)
    with pytest.raises(ValueError, match="nonfinite='drop' is not a policy"):
        robustagg.topk_abs(u, 2, nonfinite="drop")


def test_maxpool_arguments_are_checked():
    G = _G(3, 12)
    with pytest.raises(TypeError, match="layout must be a robustagg.layout.Layout"):
        robustagg.maxpool_amplify(G, [(3, 4)])
    with pytest.raises(ValueError, match=r"kernel=0 is out of range; allowed in \[1, 4\]"):
        robustagg.maxpool_amplify(G, Layout.from_shapes([(3, 4)]), 0)
    with pytest.raises(ValueError, match="covers 9 values but G has d=12"):
        robustagg.maxpool_amplify(G, Layout.from_shapes([(3, 3)]), 2)


def test_unknown_policy_is_rejected():
    with pytest.raises(ValueError, match="nonfinite='ignore' is not a policy"):
        robustagg.median(_G(), nonfinite="ignore")


# ---------------------------------------------------------------- non-finite machinery

def _poisoned(n=8, d=13, rows=(2, 5)):
    G = _G(n, d)
    G[rows[0], 3] = math.nan
    G[rows[1], 0] = -math.inf
    return G


def test_raise_reports_original_row_indices():
    with pytest.raises(NonFiniteUpdateError) as info:
        robustagg.trimmed_mean(_poisoned(), 1, backend="torch")
    assert info.value.clients == [2, 5]
    assert "[2, 5]" in str(info.value)


def test_drop_equals_the_op_on_the_finite_rows():
    G = _poisoned()
    kept = G[[0, 1, 3, 4, 6, 7]]
    torch.testing.assert_close(robustagg.median(G, nonfinite="drop", backend="torch"),
                               robustagg.median(kept, backend="torch"))


def test_drop_with_too_few_rows_left_names_the_counts():
    with pytest.raises(ValueError, match=r"trim=3 .*\[0, 2\].*n'=6 finite rows left of n=8.*\[2, 5\]"):
        robustagg.trimmed_mean(_poisoned(), 3, nonfinite="drop", backend="torch")


def test_drop_with_no_finite_row_left_is_an_error():
    G = torch.full((3, 4), math.nan, device=DEVICE)
    with pytest.raises(ValueError, match="all n=3 client rows hold NaN or Inf"):
        robustagg.median(G, nonfinite="drop", backend="torch")


def test_propagate_skips_the_check():
    out = robustagg.sign_sum(_poisoned(), nonfinite="propagate", backend="torch")
    assert out.shape == (13,)


def test_per_client_drop_gives_nan_rows_and_finite_flags():
    stats = robustagg.client_stats(_poisoned(), nonfinite="drop", backend="torch")
    assert stats.finite.tolist() == [True, True, False, True, True, False, True, True]
    assert torch.isnan(stats.norm[[2, 5]]).all() and torch.isfinite(stats.norm[[0, 1, 3]]).all()
    D = robustagg.pairwise_sqdist(_poisoned(), nonfinite="drop", backend="torch")
    assert torch.isnan(D[2]).all() and torch.isnan(D[:, 5]).all()
    assert torch.isfinite(D[[0, 1]][:, [0, 1, 3]]).all()


def test_sign_agreement_counts_only_finite_rows_under_drop():
    G = torch.ones(4, 3, device=DEVICE)
    G[1, 0] = math.nan
    agreement = robustagg.sign_agreement(G, nonfinite="drop", backend="torch")
    assert agreement.tolist() == [1.0, 1.0, 1.0]


# ---------------------------------------------------------------- row selections and flags

_BACKENDS = [b for b, state in robustagg.available_backends().items() if state == "available"
             and _backend._unavailable_reason(b, "order_mean", DEVICE) is None]

# Every coordinate-wise op, called on G with rows= or on a copy of those rows (weights per row of G).
_SELECTING = {
    "sign_sum": lambda G, w, **kw: robustagg.sign_sum(G, **kw),
    "sign_agreement": lambda G, w, **kw: robustagg.sign_agreement(G, **kw),
    "order_mean": lambda G, w, **kw: robustagg.order_mean(G, 1, 3, **kw),
    "trimmed_mean": lambda G, w, **kw: robustagg.trimmed_mean(G, 1, **kw),
    "median": lambda G, w, **kw: robustagg.median(G, **kw),
    "closest_to_median_mean": lambda G, w, **kw: robustagg.closest_to_median_mean(G, 2, **kw),
    "invariant": lambda G, w, **kw: robustagg.invariant(G, 0.3, 1, return_mask=True, **kw),
    "invariant_ranks": lambda G, w, **kw: robustagg.invariant_ranks(G, 0.3, 1, 3, return_mask=True, **kw),
    "rlr": lambda G, w, **kw: robustagg.rlr(G, 2, weights=w, server_lr=0.5, **kw),
}


def _as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


@pytest.mark.parametrize("backend", _BACKENDS)
@pytest.mark.parametrize("name", list(_SELECTING))
def test_rows_give_the_op_on_those_rows_bitwise(name, backend):
    G = _G(9, 37, dtype=torch.float64 if backend == "torch" else torch.float32)
    G[0, 5] = math.nan                     # a row the selection leaves out changes nothing
    w = torch.arange(1.0, 10.0, dtype=torch.float64)
    rows = [6, 2, 2, 8, 4]                 # unordered, with a repeat
    op = _SELECTING[name]
    got = _as_tuple(op(G, w, rows=rows, backend=backend))
    expected = _as_tuple(op(G[rows], w[rows], backend=backend))
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("backend", _BACKENDS)
@pytest.mark.parametrize("name", list(_SELECTING))
def test_drop_reruns_on_the_finite_rows_of_G_in_place(name, backend, monkeypatch):
    """The second pass of "drop" reads the kept rows of the caller's G, not a copy of them."""
    G = _G(8, 29)
    G[3, 4] = math.nan
    w = torch.arange(1.0, 9.0, dtype=torch.float64)
    calls = []
    real = _backend.raw_op

    def spy(op, chosen):
        fn = real(op, chosen)

        def recorded(X, *args):
            calls.append((X.data_ptr(), args[-1]))
            return fn(X, *args)
        return recorded

    monkeypatch.setattr(_backend, "raw_op", spy)
    out, flags = (lambda r: (r[:-1], r[-1]))(_as_tuple(_SELECTING[name](G, w, nonfinite="drop", return_nonfinite=True,
                                                                         backend=backend)))
    monkeypatch.undo()
    kept = [0, 1, 2, 4, 5, 6, 7]
    assert [ptr for ptr, _ in calls] == [G.data_ptr(), G.data_ptr()]
    assert calls[0][1] is None and calls[1][1].tolist() == kept
    assert flags.tolist() == [i == 3 for i in range(8)]
    for a, b in zip(out, _as_tuple(_SELECTING[name](G[kept], w[kept], backend=backend)), strict=True):
        assert torch.equal(a, b), name


def test_return_nonfinite_flags_the_rows_of_G_under_every_policy():
    G = _poisoned()
    expected = [i in (2, 5) for i in range(8)]
    for policy in ("drop", "propagate"):
        _, flags = robustagg.median(G, nonfinite=policy, return_nonfinite=True, backend="torch")
        assert flags.tolist() == expected
    _, flags = robustagg.median(G, rows=[0, 5, 7], nonfinite="drop", return_nonfinite=True, backend="torch")
    assert flags.tolist() == [i == 5 for i in range(8)]   # row 2 was not read
    _, flags = robustagg.median(_G(), return_nonfinite=True, backend="torch")
    assert not flags.any()
    for op in (robustagg.pairwise_sqdist, robustagg.pairwise_cosine,
               lambda X, **kw: robustagg.clip_rows(X, 1.0, **kw),
               lambda X, **kw: robustagg.maxpool_amplify(X, Layout.from_shapes([(13,)]), **kw)):
        M, flags = op(G, nonfinite="drop", return_nonfinite=True, backend="torch")
        assert flags.tolist() == expected and torch.isnan(M[2]).all()


@pytest.mark.parametrize("rows, exc, match", [
    ([0, 8], ValueError, r"rows holds row numbers from 0 to 8; allowed \[0, 7\] for n=8"),
    ([-1], ValueError, r"rows holds row numbers from -1 to -1"),
    ([], ValueError, r"rows selects m=0 rows; allowed 1 <= m <= n=8"),
    (list(range(8)) + [0], ValueError, r"rows selects m=9 rows"),
    ([[0, 1]], TypeError, r"rows must be a 1-D integer tensor"),
    ([0.5], TypeError, r"rows must be a 1-D integer tensor"),
    ("0", TypeError, r"rows must be a 1-D integer tensor"),
])
def test_bad_rows_are_rejected(rows, exc, match):
    with pytest.raises(exc, match=match):
        robustagg.median(_G(8), rows=rows)


def test_a_row_listed_twice_is_reported_once():
    with pytest.raises(NonFiniteUpdateError) as info:
        robustagg.median(_poisoned(), rows=[2, 0, 2], backend="torch")
    assert info.value.clients == [2]


def test_params_refer_to_the_selected_rows():
    with pytest.raises(ValueError, match=r"trim=2 is out of range; allowed in \[0, 1\].*n=3 rows"):
        robustagg.trimmed_mean(_G(8), 2, rows=[0, 1, 2])
    with pytest.raises(ValueError, match="the weights of the rows read sum to 0"):
        robustagg.rlr(_G(4), 0, weights=[0.0, 0.0, 1.0, 1.0], rows=[0, 1])


# The raw ops that take a row selection (the coordinate-wise ops, csrc/ops.cpp), from the op table.
_RAW_SELECTING = sorted(name for name, op in RAW_OPS.items() if "rows" in op.signature().parameters)


def _raw_selection_args(name, m):
    """The raw op's arguments after G for m selected rows: trimmed ranks, Bulyan's beta = m - 2f."""
    f = m // 4
    return {"sign_sum": (), "order_mean": (f, m - f), "invariant": (f, m - f, m // 3),
            "closest_to_median_mean": (m - 2 * f,),
            "rlr": (torch.linspace(0.5, 2.0, m, device=DEVICE), m // 2, 0.5)}[name]


@pytest.mark.parametrize("backend", _BACKENDS)
@pytest.mark.parametrize("name", _RAW_SELECTING)
def test_raw_rows_of_one_row_give_that_row(name, backend):
    G = _G(6, 9, seed=4)
    args = {"order_mean": (0, 1), "invariant": (0, 1, 1), "closest_to_median_mean": (1,),
            "rlr": (None, 1, 1.0)}.get(name, ())
    out = _backend.raw_op(name, backend)(G, *args, torch.tensor([4], device=DEVICE))
    assert out[-1].tolist() == [False]
    if name == "sign_sum":
        assert torch.equal(out[0].cpu(), reference.sign_sum(G[4:5].cpu()))
    else:
        assert torch.equal(out[0], G[4])  # the one value of each column, unanimous, with lr 1


@pytest.mark.parametrize("backend", _BACKENDS)
@pytest.mark.parametrize("name", _RAW_SELECTING)
def test_raw_rows_by_keyword_and_every_row_selected_equal_the_plain_call(name, backend):
    G = _G(7, 11, seed=5)
    G[3, 0] = math.nan  # a selected row: column 0 is NaN wherever the op reads it
    rows = torch.tensor([6, 2, 2, 0, 5, 1, 3], device=DEVICE)
    op, args = _backend.raw_op(name, backend), _raw_selection_args(name, 7)
    pairs = [(op(G, *args, rows=rows), op(G, *args, rows)),
             (op(G, *args, torch.arange(7, device=DEVICE)), op(G, *args))]
    for by_keyword_or_every, expected in pairs:
        for a, b in zip(by_keyword_or_every, expected, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 7, 20, 33, 100, 257])
@pytest.mark.parametrize("tau", [0.0, 0.2, 0.25, 0.5, 0.6, 1 / 3, 0.999, 1.0])
@pytest.mark.parametrize("strict", [True, False])
def test_min_votes_is_the_exact_float64_threshold(n, tau, strict):
    v = ops._min_votes(tau, n, strict)
    passes = [(c / n > tau) if strict else (c / n >= tau) for c in range(n + 1)]
    assert passes == [c >= v for c in range(n + 1)]


# ---------------------------------------------------------------- backends

def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="backend='fast' is not a backend"):
        robustagg.median(_G(), backend="fast")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error path")
def test_unavailable_backend_raises_with_the_reason():
    with pytest.raises(BackendUnavailableError, match="backend 'cuda' is unavailable: .*CUDA"):
        robustagg.median(_G(), backend="cuda")


def test_environment_forces_the_backend(monkeypatch):
    monkeypatch.setenv("ROBUSTAGG_BACKEND", "torch")
    assert _backend.select("order_mean", DEVICE, None) == "torch"
    monkeypatch.setenv("ROBUSTAGG_BACKEND", "bogus")
    with pytest.raises(ValueError, match="backend='bogus'"):
        robustagg.median(_G())


def test_auto_selection_prefers_compiled_kernels():
    if DEVICE.type == "cpu":
        expected = "cpu" if _backend._unavailable_reason("cpu", "order_mean", DEVICE) is None else "torch"
    else:
        expected = next(b for b in ("cuda", "triton", "torch")
                        if _backend._unavailable_reason(b, "order_mean", DEVICE) is None)
    assert _backend.select("order_mean", DEVICE, None) == expected


# The raw torch.ops.robustagg.* entry points check their own arguments (csrc/checks.h, shared by
# the cpu and cuda registrations), so a bad size reaching them is an error, never a bad address.
RAW = torch.ops.robustagg


def _raw_backends():
    return [d for d, b in (("cpu", "cpu"), ("cuda", "cuda")) if robustagg.available_backends()[b] == "available"]


def _segments(*rows):
    """The host segment table: five ints per segment."""
    return [value for row in rows for value in row]


@pytest.mark.parametrize("device", _raw_backends())
@pytest.mark.parametrize("call, match", [
    (lambda G: RAW.order_mean(G, 3, 3), r"order_mean: lo=3, hi=3 are out of range; allowed 0 <= lo < hi <= n=5"),
    (lambda G: RAW.invariant(G, 0, 5, 7), r"invariant: min_votes=7 is out of range; allowed \[0, 6\]"),
    (lambda G: RAW.rlr(G, None, 6, 1.0), r"rlr: theta=6 is out of range; allowed \[0, 5\]"),
    (lambda G: RAW.rlr(G, torch.ones(4, device=G.device), 1, 1.0), r"rlr: weights must have shape \(5,\)"),
    (lambda G: RAW.order_mean(G, 0, 1, torch.tensor([0, 5], device=G.device)),
     r"order_mean: rows holds row numbers from 0 to 5; allowed \[0, 4\] for n=5"),
    (lambda G: RAW.sign_sum(G, torch.zeros(0, dtype=torch.int64, device=G.device)),
     r"sign_sum: rows selects m=0 rows; allowed 1 <= m <= n=5"),
    (lambda G: RAW.closest_to_median_mean(G, 1, torch.zeros(6, dtype=torch.int64, device=G.device)),
     r"closest_to_median_mean: rows selects m=6 rows; allowed 1 <= m <= n=5"),
    (lambda G: RAW.invariant(G, 0, 1, 0, torch.zeros(1, device=G.device)),
     r"invariant: rows must be a 1-D int64 tensor of row numbers, got Float"),
    (lambda G: RAW.order_mean(G, 0, 3, torch.tensor([0, 1], device=G.device)),
     r"order_mean: lo=0, hi=3 are out of range; allowed 0 <= lo < hi <= n=2"),
    (lambda G: RAW.rlr(G, torch.ones(5, device=G.device), 1, 1.0, torch.tensor([0, 1], device=G.device)),
     r"rlr: weights must have shape \(2,\), one per row the op reads"),
    (lambda G: RAW.client_stats(G, 7, 1, None), r"client_stats: window_start=7 is out of range; allowed \[0, 6\]"),
    (lambda G: RAW.client_stats(G, 2, 6, None), r"client_stats: window_length=6 is out of range; allowed \[1, 5\]"),
    (lambda G: RAW.client_stats(G, 0, 1, G[0, :6]), r"client_stats: ref must be \(7,\)"),
    (lambda G: RAW.clip_rows(G, torch.ones(3)), r"clip_rows: max_norm must have shape \(5,\)"),
    (lambda G: RAW.sign_sum(G[0]), r"sign_sum: G must be 2-D \(n, d\)"),
    (lambda G: RAW.sign_sum(G.int()), r"sign_sum: G has dtype Int; supported dtypes are float16"),
    (lambda G: RAW.topk_abs(G[0], -1), r"topk_abs: k=-1 is out of range; allowed >= 0"),
    (lambda G: RAW.topk_ef_step(G[0], G[1], G[2, :6].clone(), 2, 0.0),
     r"topk_ef_step: error and momentum must match u's shape"),
    (lambda G: RAW.maxpool_amplify(G, [0, 2, 3, 1], 2, False, 7),
     r"maxpool_amplify: segments must hold five ints per segment, got 4"),
    (lambda G: RAW.maxpool_amplify(G, _segments((0, 2, 3, 1, 0)), 0, False, 7),
     r"maxpool_amplify: kernel=0 is out of range; allowed >= 1"),
    (lambda G: RAW.maxpool_amplify(G, _segments((4, 2, 2, 1, 0)), 2, False, 7),
     r"maxpool_amplify: segment 0 \(offset 4, rows 2, cols 2\) does not fit in d=7"),
    (lambda G: RAW.maxpool_amplify(G, _segments((0, 2, 2**62, 0, 0)), 2, False, 7),
     r"segment 0 \(offset 0, rows 2, cols 4611686018427387904\) does not fit in d=7"),
    (lambda G: RAW.maxpool_amplify(G, _segments((0, 2, 3, 0, 2)), 2, False, 7),
     r"maxpool_amplify: segment 0 writes 6 values at output offset 2, outside the output row of width 7"),
    (lambda G: RAW.maxpool_amplify(G, _segments((0, 2, 3, 1, 1)), 2, True, 7),
     r"with restore=True segment 0 must write where it reads"),
])
def test_raw_ops_reject_bad_arguments_with_the_same_message_on_every_backend(device, call, match):
    G = torch.randn(5, 7, device=device)
    with pytest.raises(RuntimeError, match=match):
        call(G)
