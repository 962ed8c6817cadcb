"""maxpool_amplify (docs/ops.md) against robustagg.reference on every backend.

Max-pooling selects values, so every backend must match the reference exactly (NaN where NaN).
"""
import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings, strategies as st

from conftest import DEVICE, DTYPES, backends_for
from robustagg import NonFiniteUpdateError, ops, reference
from robustagg.layout import Layout

# conv 3x3 kernels, a matrix with fewer rows than the kernel, one with fewer columns, 1-D biases,
# a 0-D scalar, an empty tensor, a 1 x 1 matrix, odd sizes.
ODD_SHAPES = [(4, 3, 3, 3), (4,), (), (5, 7), (1, 9), (9, 1), (3, 3), (2, 2, 2), (0, 4), (6,), (7, 5, 1, 1), (1, 1),
              (3, 2), (2, 5, 2), (6, 9)]


def _G(n, d, dtype, seed=0, kind="randn"):
    g = torch.Generator().manual_seed(seed)
    if kind == "ties":
        return torch.randint(-2, 3, (n, d), generator=g).to(dtype).to(DEVICE)
    return torch.randn(n, d, generator=g).to(dtype).to(DEVICE)


def _assert_matches(backend, G, layout, kernel, restore):
    out = ops.maxpool_amplify(G, layout, kernel, restore, backend=backend)
    expected = reference.maxpool_amplify(G.cpu(), layout, kernel, restore)
    assert out.dtype == G.dtype and out.shape == expected.shape
    torch.testing.assert_close(out.cpu(), expected, rtol=0, atol=0, equal_nan=True)
    return out


@pytest.mark.parametrize("backend", backends_for("maxpool_amplify"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kernel", [1, 2, 3, 4])
@pytest.mark.parametrize("restore", [False, True])
@pytest.mark.parametrize("kind", ["randn", "ties"])
def test_maxpool_odd_shapes(backend, dtype, kernel, restore, kind):
    layout = Layout.from_shapes(ODD_SHAPES)
    _assert_matches(backend, _G(5, layout.d, dtype, kernel, kind), layout, kernel, restore)


@pytest.mark.parametrize("backend", backends_for("maxpool_amplify"))
@pytest.mark.parametrize("n", [1, 2, 3, 5, 20, 33])
@pytest.mark.parametrize("restore", [False, True])
def test_maxpool_client_counts(backend, n, restore):
    layout = Layout.from_shapes([(8, 4, 3, 3), (8,), (16, 8), (16,)])
    _assert_matches(backend, _G(n, layout.d, torch.float32, n), layout, 2, restore)


@pytest.mark.parametrize("backend", backends_for("maxpool_amplify"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("width,skip_tail,d,kernel", [(7, 0, 100, 2), (7, 5, 100, 2), (10, 0, 100, 2), (3, 2, 8, 2),
                                                      (200, 0, 100, 2), (1, 0, 13, 2), (64, 3, 4099, 2),
                                                      (6, 5, 200, 2), (1, 3, 200, 1)])
@pytest.mark.parametrize("restore", [False, True])
def test_maxpool_flat_layout(backend, dtype, width, skip_tail, d, kernel, restore):
    """Layout.flat: rows of `width`, a partial last row dropped, the last skip_tail values skipped."""
    _assert_matches(backend, _G(3, d, dtype, d), Layout.flat(width, skip_tail), kernel, restore)


@pytest.mark.parametrize("backend", backends_for("maxpool_amplify"))
def test_maxpool_ties_restore_keeps_first_argmax(backend):
    layout = Layout.from_shapes([(2, 4)])
    G = torch.tensor([[1.0, 5.0, 5.0, -1.0, 5.0, 5.0, -1.0, -1.0]], device=DEVICE)
    out = ops.maxpool_amplify(G, layout, 2, restore=True, backend=backend)
    # windows (rows 0-1, cols 0-1): [1, 5 / 5, 5] -> first 5 at (0, 1); cols 2-3: [5, -1 / -1, -1] -> (0, 2)
    assert out.cpu().tolist() == [[0.0, 5.0, 5.0, 0.0, 0.0, 0.0, 0.0, 0.0]]
    _assert_matches(backend, _G(4, 200, torch.float32, kind="ties"), Layout.flat(10), 2, True)
    for dtype in (torch.float32, torch.float64):  # rows wide enough for the vectorized path
        _assert_matches(backend, _G(4, 64 * 9, dtype, kind="ties"), Layout.flat(64), 2, True)
        signed_zeros = torch.zeros(4, 64 * 9, dtype=dtype, device=DEVICE)
        signed_zeros[:, ::3] = -0.0
        out = ops.maxpool_amplify(signed_zeros, Layout.flat(64), 2, restore=True, backend=backend)
        expected = reference.maxpool_amplify(signed_zeros.cpu(), Layout.flat(64), 2, restore=True)
        assert torch.equal(out.cpu().signbit(), expected.signbit())


@pytest.mark.parametrize("backend", backends_for("maxpool_amplify"))
def test_maxpool_raw_signed_max(backend):
    layout = Layout.from_shapes([(2, 2)])
    G = torch.tensor([[-5.0, -1.0, -3.0, -2.0]], device=DEVICE)
    assert ops.maxpool_amplify(G, layout, 2, backend=backend).cpu().tolist() == [[-1.0]]


@pytest.mark.parametrize("backend", backends_for("maxpool_amplify"))
def test_maxpool_signed_zeros_subnormals_huge(backend):
    tiny = torch.finfo(torch.float32).tiny / 4
    G = torch.tensor([[-0.0, 0.0, tiny, -tiny, 3e38, -3e38, -3e38, 1.0]], device=DEVICE)
    _assert_matches(backend, G, Layout.flat(2), 2, False)
    _assert_matches(backend, G, Layout.flat(2), 2, True)


@pytest.mark.parametrize("backend", backends_for("maxpool_amplify"))
def test_maxpool_pass_through_segments_copied(backend):
    layout = Layout.from_shapes([(5,), (), (3,)])
    G = _G(2, 9, torch.float32)
    assert torch.equal(ops.maxpool_amplify(G, layout, 2, backend=backend), G)
    assert torch.equal(ops.maxpool_amplify(G, layout, 2, restore=True, backend=backend), G)


@pytest.mark.parametrize("backend", backends_for("maxpool_amplify"))
@pytest.mark.parametrize("where", ["pooled", "dropped_row", "pass_through", "flat_dropped_row", "flat_tail"])
@pytest.mark.parametrize("restore", [False, True])
@pytest.mark.parametrize("bad_value", [float("nan"), float("-inf")])
def test_maxpool_nonfinite_anywhere_in_the_row(backend, where, restore, bad_value):
    """A NaN or Inf is found wherever it sits, also in values that pooling drops, and a -Inf that
    is not its window's max."""
    if where.startswith("flat"):  # 5 rows of 4, then a skipped tail of 3
        layout, d, col = Layout.flat(4, skip_tail=3), 23, {"flat_dropped_row": 19, "flat_tail": 21}[where]
    else:
        layout = Layout.from_shapes([(3, 4), (5,)])
        d, col = 17, {"pooled": 1, "dropped_row": 9, "pass_through": 14}[where]
    G = _G(4, d, torch.float32)
    G[2, col] = bad_value
    with pytest.raises(NonFiniteUpdateError) as info:
        ops.maxpool_amplify(G, layout, 2, restore, backend=backend)
    assert info.value.clients == [2]
    out = ops.maxpool_amplify(G, layout, 2, restore, nonfinite="propagate", backend=backend)
    torch.testing.assert_close(out.cpu(), reference.maxpool_amplify(G.cpu(), layout, 2, restore), rtol=0, atol=0,
                               equal_nan=True)
    if where == "pooled" and bad_value < 0:
        assert torch.isfinite(out).all()  # the window's max is finite


@pytest.mark.parametrize("backend", backends_for("maxpool_amplify"))
@pytest.mark.parametrize("restore", [False, True])
def test_maxpool_nonfinite_drop_and_propagate(backend, restore):
    layout = Layout.from_shapes([(4, 4), (3,)])
    G = _G(3, 19, torch.float32)
    G[0, 5] = float("inf")
    out = ops.maxpool_amplify(G, layout, 2, restore, nonfinite="drop", backend=backend)
    assert torch.isnan(out[0]).all()
    expected = reference.maxpool_amplify(G[1:].cpu(), layout, 2, restore)
    assert torch.equal(out[1:].cpu(), expected)
    out = ops.maxpool_amplify(G, layout, 2, restore, nonfinite="propagate", backend=backend)
    assert torch.equal(out.cpu(), reference.maxpool_amplify(G.cpu(), layout, 2, restore))


@pytest.mark.parametrize("backend", backends_for("maxpool_amplify"))
def test_maxpool_nan_propagates_like_max_pool2d(backend):
    G = torch.tensor([[1.0, float("nan"), 2.0, 3.0]], device=DEVICE)
    out = ops.maxpool_amplify(G, Layout.flat(2), 2, nonfinite="propagate", backend=backend)
    assert torch.isnan(out).all()


@pytest.mark.parametrize("backend", backends_for("maxpool_amplify"))
def test_maxpool_real_module_layout(backend):
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8 * 5 * 5, 10))
    layout = Layout.from_shapes(model)
    G = _G(4, layout.d, torch.float32)
    out = _assert_matches(backend, G, layout, 2, False)
    assert out.shape[1] == layout.pooled_width(layout.d, 2)


@pytest.mark.parametrize("backend", backends_for("maxpool_amplify"))
def test_maxpool_non_contiguous_and_deterministic(backend):
    layout = Layout.from_shapes([(6, 6), (4,)])
    G = _G(6, 80, torch.float32)[::2, 3:43]
    assert not G.is_contiguous()
    out = _assert_matches(backend, G, layout, 2, False)
    assert torch.equal(out, ops.maxpool_amplify(G, layout, 2, backend=backend))


def test_maxpool_layout_must_cover_d():
    with pytest.raises(ValueError, match="layout covers"):
        ops.maxpool_amplify(torch.ones(2, 10), Layout.from_shapes([(3, 3)]), 2)
    with pytest.raises(ValueError, match="kernel"):
        ops.maxpool_amplify(torch.ones(2, 9), Layout.from_shapes([(3, 3)]), 0)


@settings(max_examples=40, deadline=None)
@given(shapes=st.lists(st.lists(st.integers(0, 6), min_size=0, max_size=4).map(tuple), min_size=1, max_size=5),
       kernel=st.integers(1, 3), restore=st.booleans(), seed=st.integers(0, 100))
def test_maxpool_property(shapes, kernel, restore, seed):
    layout = Layout.from_shapes(shapes)
    if layout.d == 0:
        return
    G = _G(3, layout.d, torch.float32, seed, kind="ties" if seed % 2 else "randn")
    dims = [max(s.rows, s.cols) for s in layout.segments_for(layout.d) if s.pooled]
    if dims and kernel > max(dims + [2]):
        # A window wider than every pooled segment (and than the paper's 2) pools nothing: refused.
        with pytest.raises(ValueError, match=f"kernel={kernel} is out of range"):
            ops.maxpool_amplify(G, layout, kernel, restore)
        return
    for backend in ("cpu", "torch"):
        _assert_matches(backend, G, layout, kernel, restore)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("restore", [False, True])
def test_opcheck_maxpool_amplify(dtype, restore):
    layout = Layout.from_shapes(ODD_SHAPES)
    G = _G(3, layout.d, dtype)
    table = layout.segment_table(layout.d, 2, restore)
    width = layout.d if restore else layout.pooled_width(layout.d, 2)
    torch.library.opcheck(torch.ops.robustagg.maxpool_amplify.default, (G, table, 2, restore, width))


@pytest.mark.parametrize("backend", backends_for("maxpool_amplify"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("bad_value", [float("nan"), float("inf"), float("-inf")])
def test_maxpool_nonfinite_in_wide_rows_propagates_like_reference(backend, dtype, bad_value):
    """Rows wide enough for the vectorized kernel-2 path; NaN must still win its window."""
    G = _G(3, 128 * 6, dtype)
    G[1, 2 * 128 + 37] = bad_value
    G[1, 3 * 128 + 64] = bad_value
    G[2, 5] = bad_value
    out = ops.maxpool_amplify(G, Layout.flat(128), 2, nonfinite="propagate", backend=backend)
    expected = reference.maxpool_amplify(G.cpu(), Layout.flat(128), 2)
    torch.testing.assert_close(out.cpu(), expected, rtol=0, atol=0, equal_nan=True)
