"""topk_ef_step and topk_abs (docs/ops.md) against robustagg.reference on every backend.

The selection is exact and the update is elementwise in the arithmetic dtype, so every backend
must reproduce the reference bit for bit: indices, values, error and momentum.
"""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from conftest import DEVICE, DTYPES, backends_for
from robustagg import ops, reference

DS = [1, 7, 1023, 1024, 1025, 4093, 4096]


def _vec(d, dtype, seed=0, kind="randn"):
    g = torch.Generator().manual_seed(seed)
    if kind == "distinct":  # distinct magnitudes, so the selected set is unambiguous
        x = (torch.randperm(d, generator=g).double() + 1) * torch.where(torch.rand(d, generator=g) < 0.5, -1.0, 1.0)
        x = x / d
    elif kind == "ties":
        x = torch.randint(-3, 4, (d,), generator=g).double()
    else:
        x = torch.randn(d, generator=g, dtype=torch.float64)
    return x.to(dtype).to(DEVICE)


def _assert_step_matches(backend, u, error, momentum, k, rho):
    e_ref, m_ref = error.clone(), momentum.clone()
    idx_ref, val_ref = reference.topk_ef_step(u, e_ref, m_ref, k, rho)
    idx, val = ops.topk_ef_step(u, error, momentum, k, rho, backend=backend)
    assert idx.dtype == torch.int64 and val.dtype == u.dtype
    assert torch.equal(idx.cpu(), idx_ref.cpu())
    assert torch.equal(val.cpu(), val_ref.cpu())
    assert torch.equal(error.cpu(), e_ref.cpu())
    assert torch.equal(momentum.cpu(), m_ref.cpu())


def _assert_abs_matches(backend, x, k):
    idx_ref, val_ref = reference.topk_abs(x, k)
    idx, val = ops.topk_abs(x, k, backend=backend)
    assert torch.equal(idx.cpu(), idx_ref.cpu())
    assert torch.equal(val.cpu(), val_ref.cpu())


# ---------------------------------------------------------------- topk_abs

@pytest.mark.parametrize("backend", backends_for("topk_abs"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", DS)
@pytest.mark.parametrize("kind", ["randn", "distinct", "ties"])
def test_topk_abs_matches_reference(backend, dtype, d, kind):
    x = _vec(d, dtype, seed=d, kind=kind)
    for k in sorted({1, d // 100 + 1, d // 3, d - 1}):
        _assert_abs_matches(backend, x, k)


@pytest.mark.parametrize("backend", [b for b in backends_for("topk_abs") if b.id != "triton"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["randn", "ties"])
def test_topk_abs_across_chunks(backend, dtype, kind):
    # the CPU kernel classifies in chunks of 2^16 coordinates, 16 at a time on AVX-512: several
    # chunks, a partial last one and a partial last vector (the interpreter is too slow for this d)
    d = 3 * 65536 + 13
    x = _vec(d, dtype, seed=5, kind=kind)
    for k in (1, d // 100 + 1, d // 3):
        _assert_abs_matches(backend, x, k)


@pytest.mark.parametrize("backend", backends_for("topk_abs"))
@pytest.mark.parametrize("k", [0, 1, 99, 100, 101, 1000])
def test_topk_abs_k_edges(backend, k):
    x = _vec(100, torch.float32, kind="distinct")
    idx, val = ops.topk_abs(x, k, backend=backend)
    assert idx.numel() == min(k, 100)
    _assert_abs_matches(backend, x, k)
    if k >= 100:
        assert torch.equal(idx.cpu(), torch.arange(100))


@pytest.mark.parametrize("backend", backends_for("topk_abs"))
@pytest.mark.parametrize("d,k", [(100, 7), (1400, 999)])
def test_topk_abs_all_equal_magnitudes_take_lowest_indices(backend, d, k):
    x = torch.tensor([1.0, -1.0] * (d // 2), device=DEVICE)
    idx, val = ops.topk_abs(x, k, backend=backend)
    assert idx.cpu().tolist() == list(range(k))
    assert val.cpu().tolist() == [1.0, -1.0] * (k // 2) + [1.0] * (k % 2)


@pytest.mark.parametrize("backend", backends_for("topk_abs"))
def test_topk_abs_ties_at_kth_go_to_lower_index(backend):
    x = torch.tensor([0.5, 2.0, -1.0, 1.0, 3.0, -1.0, 1.0, 0.0], device=DEVICE)
    idx, _ = ops.topk_abs(x, 4, backend=backend)
    assert idx.cpu().tolist() == [1, 2, 3, 4]  # 3.0, 2.0, then two of the four |1.0|: indices 2 and 3


@pytest.mark.parametrize("backend", backends_for("topk_abs"))
def test_topk_abs_signed_zeros_and_subnormals(backend):
    tiny = torch.finfo(torch.float32).tiny / 4
    x = torch.tensor([0.0, -0.0, tiny, -2 * tiny, 0.0], device=DEVICE)
    idx, val = ops.topk_abs(x, 3, backend=backend)
    assert idx.cpu().tolist() == [0, 2, 3]
    _assert_abs_matches(backend, x, 3)


@pytest.mark.parametrize("backend", backends_for("topk_abs"))
def test_topk_abs_huge_values(backend):
    x = _vec(500, torch.float32)
    x[17], x[400] = 3e38, -3e38
    idx, val = ops.topk_abs(x, 2, backend=backend)
    assert idx.cpu().tolist() == [17, 400] and torch.equal(val, x[[17, 400]])
    x = torch.tensor([1.0, -3e38, 3e38, 2.0, -1e-45], device=DEVICE)  # beside a subnormal
    idx, val = ops.topk_abs(x, 2, backend=backend)
    assert idx.cpu().tolist() == [1, 2] and torch.equal(val, x[[1, 2]])


@pytest.mark.parametrize("backend", backends_for("topk_abs"))
def test_topk_abs_nonfinite(backend):
    x = _vec(50, torch.float32)
    x[10] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        ops.topk_abs(x, 5, backend=backend)
    idx, _ = ops.topk_abs(x, 5, nonfinite="propagate", backend=backend)
    assert 10 in idx.cpu().tolist()  # NaN ranks above every magnitude, as in torch.sort


@pytest.mark.parametrize("backend", backends_for("topk_abs"))
def test_topk_abs_non_contiguous(backend):
    x = _vec(400, torch.float32)[::3]
    _assert_abs_matches(backend, x, 20)


# ---------------------------------------------------------------- topk_ef_step

@pytest.mark.parametrize("backend", backends_for("topk_ef_step"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", DS)
@pytest.mark.parametrize("rho", [0.0, 0.9])
def test_topk_ef_step_matches_reference(backend, dtype, d, rho):
    u, e, m = _vec(d, dtype, d), _vec(d, dtype, d + 1), _vec(d, dtype, d + 2)
    _assert_step_matches(backend, u, e, m, max(1, d // 100), rho)


@pytest.mark.parametrize("backend", backends_for("topk_ef_step"))
@pytest.mark.parametrize("d", [257, 1500])
@pytest.mark.parametrize("k", [0, 1, 256, 257, 258, 1500, 10_000])
def test_topk_ef_step_k_edges(backend, d, k):
    u, e, m = _vec(d, torch.float32, 1), _vec(d, torch.float32, 2), _vec(d, torch.float32, 3)
    _assert_step_matches(backend, u, e, m, k, 0.5)


@pytest.mark.parametrize("backend", backends_for("topk_ef_step"))
def test_topk_ef_step_k_zero_still_updates_state(backend):
    u = torch.ones(5, device=DEVICE)
    e, m = torch.zeros(5, device=DEVICE), torch.ones(5, device=DEVICE)
    idx, val = ops.topk_ef_step(u, e, m, 0, 0.5, backend=backend)
    assert idx.numel() == 0 and val.numel() == 0
    assert e.cpu().tolist() == [1.5] * 5 and m.cpu().tolist() == [1.5] * 5


@pytest.mark.parametrize("backend", backends_for("topk_ef_step"))
def test_topk_ef_step_k_at_least_d_selects_everything(backend):
    u = _vec(9, torch.float32)
    e, m = torch.zeros(9, device=DEVICE), torch.zeros(9, device=DEVICE)
    idx, val = ops.topk_ef_step(u, e, m, 9, 0.0, backend=backend)
    assert idx.cpu().tolist() == list(range(9))
    assert torch.equal(val, u)
    assert (e == 0).all() and (m == 0).all()


@pytest.mark.parametrize("backend", backends_for("topk_ef_step"))
def test_topk_ef_step_all_equal_magnitudes(backend):
    d = 1000
    u = torch.where(torch.arange(d) % 3 == 0, -0.25, 0.25).to(DEVICE)
    e, m = torch.zeros(d, device=DEVICE), torch.zeros(d, device=DEVICE)
    idx, val = ops.topk_ef_step(u, e, m, 10, 0.0, backend=backend)
    assert idx.cpu().tolist() == list(range(10))
    assert (e[10:] == u[10:]).all() and (e[:10] == 0).all()


@pytest.mark.parametrize("backend", backends_for("topk_ef_step"))
def test_topk_ef_step_ties(backend):
    d = 2048
    u, e, m = (_vec(d, torch.float32, s, kind="ties") for s in (1, 2, 3))
    _assert_step_matches(backend, u, e, m, 300, 0.0)


@pytest.mark.parametrize("backend", backends_for("topk_ef_step"))
@pytest.mark.parametrize("bad_value", [float("nan"), float("inf"), float("-inf")])
def test_topk_ef_step_nonfinite_u_leaves_state_untouched(backend, bad_value):
    u, e, m = _vec(100, torch.float32, 1), _vec(100, torch.float32, 2), _vec(100, torch.float32, 3)
    u[37] = bad_value
    e0, m0 = e.clone(), m.clone()
    with pytest.raises(ValueError, match="nothing was updated"):
        ops.topk_ef_step(u, e, m, 5, 0.9, backend=backend)
    assert torch.equal(e, e0) and torch.equal(m, m0)
    idx, val = ops.topk_ef_step(u, e, m, 5, 0.9, nonfinite="propagate", backend=backend)
    assert idx.numel() == 0 and val.numel() == 0
    assert torch.equal(e, e0) and torch.equal(m, m0)


@pytest.mark.parametrize("backend", backends_for("topk_ef_step"))
def test_topk_ef_step_huge_values(backend):
    u, e, m = _vec(300, torch.float32, 1), _vec(300, torch.float32, 2), _vec(300, torch.float32, 3)
    u[5] = 3e38
    _assert_step_matches(backend, u, e, m, 3, 0.0)


@pytest.mark.parametrize("backend", backends_for("topk_ef_step"))
@pytest.mark.parametrize("dtype,huge", [(torch.float32, 3e38), (torch.float16, 6e4), (torch.bfloat16, 3e38),
                                        (torch.float64, 1.7e308)], ids=str)
@pytest.mark.parametrize("rho", [0.0, 0.9])
def test_topk_ef_step_state_saturates_at_the_largest_finite_value(backend, dtype, huge, rho):
    # step 1 sends index 0; in step 2 indices 1 and 5 hold +-(error + u), beyond the dtype
    u = torch.zeros(8, dtype=dtype)
    u[:2] = huge
    u[5] = -huge
    u = u.to(DEVICE)
    e, m = torch.zeros(8, dtype=dtype, device=DEVICE), torch.zeros(8, dtype=dtype, device=DEVICE)
    e_ref, m_ref = e.clone(), m.clone()
    for _ in range(2):
        idx, val = ops.topk_ef_step(u, e, m, 1, rho, backend=backend)
        idx_ref, val_ref = reference.topk_ef_step(u, e_ref, m_ref, 1, rho)
        assert torch.equal(idx, idx_ref) and torch.equal(val, val_ref)
        assert torch.equal(e, e_ref) and torch.equal(m, m_ref)
    limit = torch.finfo(dtype).max  # 65504 for float16
    assert idx.cpu().tolist() == [1] and val.cpu().tolist() == [limit]
    assert e[5] == -limit and torch.isfinite(e).all() and torch.isfinite(m).all()
    if rho > 0:
        assert m[5] == -limit  # 0.9 * momentum + u is beyond the dtype too


@pytest.mark.parametrize("backend", backends_for("topk_ef_step"))
def test_topk_ef_step_float32_error_of_twice_3e38_saturates_at_flt_max(backend):
    u = torch.tensor([3e38, 3e38, 1.0], device=DEVICE)
    e, m = torch.zeros(3, device=DEVICE), torch.zeros(3, device=DEVICE)
    first, _ = ops.topk_ef_step(u, e, m, 1, 0.0, backend=backend)  # the tie's lower index: 0
    second, sent = ops.topk_ef_step(u, e, m, 1, 0.0, backend=backend)  # index 1: 3e38 + 3e38
    assert first.cpu().tolist() == [0] and second.cpu().tolist() == [1]
    assert sent.cpu().tolist() == [torch.finfo(torch.float32).max]
    assert torch.equal(e.cpu(), torch.tensor([3e38, 0.0, 2.0]))


@pytest.mark.parametrize("backend", backends_for("topk_ef_step"))
def test_topk_ef_step_sequence_of_steps(backend):
    d = 3001
    e, m = torch.zeros(d, device=DEVICE), torch.zeros(d, device=DEVICE)
    e_ref, m_ref = e.clone(), m.clone()
    for step in range(4):
        u = _vec(d, torch.float32, step)
        idx, val = ops.topk_ef_step(u, e, m, 30, 0.9, backend=backend)
        idx_ref, val_ref = reference.topk_ef_step(u, e_ref, m_ref, 30, 0.9)
        assert torch.equal(idx, idx_ref) and torch.equal(val, val_ref)
    assert torch.equal(e, e_ref) and torch.equal(m, m_ref)


@pytest.mark.parametrize("backend", backends_for("topk_ef_step"))
def test_topk_ef_step_non_contiguous_state(backend):
    d = 500
    u = _vec(d, torch.float32, 1)
    e_store, m_store = _vec(2 * d, torch.float32, 2), _vec(2 * d, torch.float32, 3)
    e, m = e_store[::2], m_store[::2]
    e_ref, m_ref = e.clone(), m.clone()
    idx_ref, val_ref = reference.topk_ef_step(u, e_ref, m_ref, 7, 0.9)
    idx, val = ops.topk_ef_step(u, e, m, 7, 0.9, backend=backend)
    assert torch.equal(idx, idx_ref) and torch.equal(val, val_ref)
    assert torch.equal(e, e_ref) and torch.equal(m, m_ref)
    assert torch.equal(e_store[::2], e_ref)


@pytest.mark.parametrize("backend", backends_for("topk_ef_step"))
def test_topk_ef_step_and_topk_abs_deterministic(backend):
    u = _vec(50_000, torch.float32, kind="ties")
    outs = []
    for _ in range(2):
        e, m = torch.zeros_like(u), torch.zeros_like(u)
        step = ops.topk_ef_step(u, e, m, 5000, 0.9, backend=backend)
        outs.append(step + (e, m) + ops.topk_abs(u, 5000, backend=backend))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_topk_bad_k():
    with pytest.raises(ValueError, match="k=-1"):
        ops.topk_abs(torch.ones(3), -1)
    with pytest.raises(ValueError, match="momentum"):
        ops.topk_ef_step(torch.ones(3), torch.ones(3), torch.ones(4), 1, 0.9)


@settings(max_examples=50, deadline=None)
@given(d=st.integers(1, 400), data=st.data())
def test_topk_property(d, data):
    values = st.sampled_from([0.0, -0.0, 1.0, -1.0, 0.5, -2.0, 3.0, 1e-40, -7.5])
    draw = lambda: torch.tensor(data.draw(st.lists(values, min_size=d, max_size=d)), dtype=torch.float32)
    u, e, m = draw(), draw(), draw()
    k = data.draw(st.integers(0, d + 2))
    rho = data.draw(st.sampled_from([0.0, 0.5, 0.9]))
    for backend in ("cpu", "torch"):
        _assert_abs_matches(backend, u, k)
        _assert_step_matches(backend, u, e.clone(), m.clone(), k, rho)


# ---------------------------------------------------------------- opcheck

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_opcheck_topk_abs(dtype):
    torch.library.opcheck(torch.ops.robustagg.topk_abs.default, (_vec(300, dtype, kind="ties"), 17))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_opcheck_topk_ef_step(dtype):
    u, e, m = _vec(300, dtype, 1), _vec(300, dtype, 2), _vec(300, dtype, 3)
    torch.library.opcheck(torch.ops.robustagg.topk_ef_step.default, (u, e, m, 17, 0.9))
