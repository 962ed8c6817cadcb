"""pairwise_sqdist and pairwise_cosine (docs/ops.md) against robustagg.reference on every backend."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from conftest import DEVICE, DTYPES, backends_for, to_reference
import robustagg
from robustagg import NonFiniteUpdateError, ops, reference

NS = [1, 2, 3, 5, 20, 33, 64, 100, 257]
DS = [1, 7, 1023, 1024, 1025, 4093]
OPS = ["pairwise_sqdist", "pairwise_cosine"]


def _G(n, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g).to(dtype).to(DEVICE)


def _run(op, G, backend, **kw):
    return getattr(ops, op)(G, backend=backend, **kw)


def _expected(op, G):
    return getattr(reference, op)(to_reference(G))


def _check(op, out, G):
    # float64 for every dtype: a squared distance between float32 rows of 3e38 fits only there
    expected = _expected(op, G)
    assert out.dtype == torch.float64 and out.shape == (G.shape[0],) * 2
    # docs/ops.md: relative error <= 1e-5 against float64 (1e-12 for float64 inputs)
    rtol = 1e-12 if G.dtype == torch.float64 else 1e-5
    scale = to_reference(G).abs().max().item() ** 2 * (1 if op == "pairwise_cosine" else G.shape[1])
    torch.testing.assert_close(out.double().cpu(), expected, rtol=rtol, atol=rtol * 1e-3 * max(scale, 1e-30),
                               equal_nan=True)
    assert torch.equal(out, out.T)


@pytest.mark.parametrize("backend", backends_for("pairwise_sqdist"))
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", NS)
def test_pairwise_matches_reference(backend, op, dtype, n):
    d = DS[n % len(DS)]
    G = _G(n, d, dtype, seed=n)
    _check(op, _run(op, G, backend), G)


@pytest.mark.parametrize("backend", backends_for("pairwise_sqdist"))
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("d", DS)
def test_pairwise_awkward_widths(backend, op, d):
    G = _G(6, d, torch.float32, seed=d)
    _check(op, _run(op, G, backend), G)


@pytest.mark.parametrize("backend", backends_for("pairwise_sqdist"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_identical_rows_give_exact_zero_and_one(backend, dtype):
    """Colluding attackers send identical updates; Krum and Bulyan rely on exact zeros."""
    G = _G(9, 1025, dtype, seed=4) * 100 + 3
    G[4] = G[1]
    G[7] = G[1]
    G[8] = G[2]
    D = _run("pairwise_sqdist", G, backend)
    C = _run("pairwise_cosine", G, backend)
    for i, j in [(1, 4), (1, 7), (4, 7), (2, 8)]:
        assert D[i, j].item() == 0.0 and D[j, i].item() == 0.0
        assert C[i, j].item() == 1.0 and C[j, i].item() == 1.0
    assert (torch.diagonal(D) == 0).all() and (torch.diagonal(C) == 1).all()
    off = ~torch.eye(9, dtype=torch.bool, device=D.device)
    off[1, 4] = off[4, 1] = off[1, 7] = off[7, 1] = off[4, 7] = off[7, 4] = off[2, 8] = off[8, 2] = False
    assert (D[off] > 0).all() and (C[off] < 1).all()


@pytest.mark.parametrize("backend", backends_for("pairwise_sqdist"))
def test_identical_rows_with_signed_zeros(backend):
    G = torch.tensor([[0.0, 1.0, -0.0], [-0.0, 1.0, 0.0], [0.0, 2.0, 0.0]], device=DEVICE)
    assert _run("pairwise_sqdist", G, backend)[0, 1].item() == 0.0
    assert _run("pairwise_cosine", G, backend)[0, 1].item() == 1.0


@pytest.mark.parametrize("backend", backends_for("pairwise_sqdist"))
@pytest.mark.parametrize("gap", [1e-2, 1e-3, 1e-4])
def test_nearly_identical_rows_keep_precision(backend, gap):
    """Rows a large common vector apart by a small gap: the Gram formula cancels, the kernel must not."""
    G = _G(4, 4093, torch.float32, seed=1)
    G[0] = 1000 + G[0]
    G[1] = G[0] + gap * G[2].sign()
    D = _run("pairwise_sqdist", G, backend)
    expected = _expected("pairwise_sqdist", G)
    assert D[0, 1].item() > 0
    assert abs(D[0, 1].item() - expected[0, 1].item()) <= 1e-5 * expected[0, 1].item()


@pytest.mark.parametrize("backend", backends_for("pairwise_sqdist"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_zero_rows(backend, dtype):
    G = _G(4, 50, dtype)
    G[1] = 0
    G[3] = 0
    C = _run("pairwise_cosine", G, backend)
    assert (C[1] == 0).all() and (C[:, 3] == 0).all() and C[1, 1].item() == 0.0 and C[0, 0].item() == 1.0
    D = _run("pairwise_sqdist", G, backend)
    assert D[1, 3].item() == 0.0
    _check("pairwise_sqdist", D, G)


@pytest.mark.parametrize("backend", backends_for("pairwise_sqdist"))
def test_opposite_and_orthogonal_rows(backend):
    G = torch.tensor([[1.0, 2.0, 0.0], [-1.0, -2.0, 0.0], [0.0, 0.0, 5.0]], device=DEVICE)
    C = _run("pairwise_cosine", G, backend)
    assert C[0, 1].item() == pytest.approx(-1.0, abs=4e-16) and C[0, 2].item() == 0.0
    assert _run("pairwise_sqdist", G, backend)[0, 1].item() == pytest.approx(20.0, rel=4e-16)


@pytest.mark.parametrize("backend", backends_for("pairwise_sqdist"))
@pytest.mark.parametrize("op", OPS)
def test_huge_values(backend, op):
    G = _G(5, 100, torch.float32)
    G[1, 3] = 3e38
    G[2, 50] = -3e38
    out = _run(op, G, backend)
    _check(op, out, G)
    if op == "pairwise_cosine":
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("backend", backends_for("pairwise_sqdist"))
def test_cosines_of_rows_of_1e30_are_exactly_plus_minus_one(backend):
    G = torch.full((3, 50), 1e30, device=DEVICE)  # every square overflows float32
    G[1] = -1e30
    C = _run("pairwise_cosine", G, backend).cpu()
    assert C.tolist() == [[1.0, -1.0, 1.0], [-1.0, 1.0, -1.0], [1.0, -1.0, 1.0]]


@pytest.mark.parametrize("backend", backends_for("pairwise_sqdist"))
def test_float64_huge_tiny_and_zero_rows_match_reference(backend):
    """Rows of 1e300 (squares overflow), 1e-300 (squares underflow), zeros, and ordinary rows."""
    G = _G(7, 40, torch.float64, seed=11).cpu()
    G[0] *= 1e300
    G[1] *= 1e-300
    G[2] = 0
    G[3] = G[1]           # identical tiny rows: their distance underflows to 0 anyway
    G[4] = -G[0]
    G[5, :20] = 1e-300    # a row of mixed scale
    D = _run("pairwise_sqdist", G.to(DEVICE), backend)
    C = _run("pairwise_cosine", G.to(DEVICE), backend)
    torch.testing.assert_close(D.cpu(), reference.pairwise_sqdist(G), rtol=1e-12, atol=0.0)
    torch.testing.assert_close(C.cpu(), reference.pairwise_cosine(G), rtol=1e-12, atol=1e-15)
    assert torch.isfinite(C).all()
    assert C[0, 4] == -1 and C[1, 3] == 1 and C.diagonal().cpu().tolist() == [1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0]
    assert C[2].abs().sum() == 0 and torch.equal(C, C.T)


@pytest.mark.parametrize("backend", backends_for("pairwise_sqdist"))
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")])
def test_nonfinite_raise(backend, op, bad_value):
    G = _G(5, 40, torch.float32)
    G[3, 7] = bad_value
    with pytest.raises(NonFiniteUpdateError) as info:
        _run(op, G, backend)
    assert info.value.clients == [3]


@pytest.mark.parametrize("backend", backends_for("pairwise_sqdist"))
@pytest.mark.parametrize("op", OPS)
def test_nonfinite_drop_gives_nan_rows_and_columns(backend, op):
    G = _G(5, 40, torch.float32)
    G[1, 0] = float("nan")
    G[3, 39] = float("-inf")
    out = _run(op, G, backend, nonfinite="drop")
    bad = torch.tensor([False, True, False, True, False], device=out.device)
    assert torch.isnan(out[bad]).all() and torch.isnan(out[:, bad]).all()
    keep = torch.tensor([0, 2, 4])
    assert not torch.isnan(out[keep][:, keep]).any()
    expected = _expected(op, G[keep])
    torch.testing.assert_close(out[keep][:, keep].double().cpu(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", backends_for("pairwise_sqdist"))
@pytest.mark.parametrize("op", OPS)
def test_nonfinite_propagate_does_not_crash(backend, op):
    G = _G(3, 10, torch.float32)
    G[0] = float("nan")
    out = _run(op, G, backend, nonfinite="propagate")
    # the NaN row's entries are unspecified under "propagate"; the finite rows are unaffected
    torch.testing.assert_close(out[1:, 1:].double().cpu(), _expected(op, G[1:]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", backends_for("pairwise_sqdist"))
@pytest.mark.parametrize("op", OPS)
def test_non_contiguous(backend, op):
    G = _G(10, 300, torch.float32)[::2, ::3]
    assert not G.is_contiguous()
    _check(op, _run(op, G, backend), G.contiguous())


@pytest.mark.parametrize("backend", backends_for("pairwise_sqdist"))
@pytest.mark.parametrize("op", OPS)
def test_deterministic(backend, op):
    G = _G(20, 70001, torch.float32)
    assert torch.equal(_run(op, G, backend), _run(op, G, backend))


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 8), d=st.integers(1, 64), data=st.data())
def test_pairwise_property(n, d, data):
    values = st.sampled_from([0.0, -0.0, 1.0, -1.0, 0.5, 3.0, -2.25, 1e-3])
    G = torch.tensor(data.draw(st.lists(values, min_size=n * d, max_size=n * d)), dtype=torch.float32).reshape(n, d)
    if data.draw(st.booleans()) and n > 1:
        G[n - 1] = G[0]
    for backend in ("cpu", "torch"):
        for op in OPS:
            out = _run(op, G, backend)
            _check(op, out, G)
            equal = (to_reference(G)[:, None, :] == to_reference(G)[None, :, :]).all(-1)
            nonzero = to_reference(G).abs().sum(1) > 0
            if op == "pairwise_sqdist":
                assert torch.equal(out.cpu() == 0, equal)
            else:
                # parallel rows may also give exactly 1, so only equal rows are pinned
                same = equal & nonzero[:, None] & nonzero[None, :]
                assert (out.cpu()[same] == 1).all() and (out.cpu()[~nonzero] == 0).all()


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_opcheck_pairwise(op, dtype):
    torch.library.opcheck(getattr(torch.ops.robustagg, op).default, (_G(7, 33, dtype),))


@pytest.mark.skipif(robustagg.available_backends()["cpu"] != "available", reason="the cpu backend is not built")
def test_cpu_results_independent_of_thread_count():
    """Column chunks depend on d and n only, so OMP thread counts cannot change a bit."""
    G = _G(9, 300_001, torch.float32)
    G[5] = G[2]
    before = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            outs.append((ops.pairwise_sqdist(G, backend="cpu"), ops.pairwise_cosine(G, backend="cpu")))
    finally:
        torch.set_num_threads(before)
    for other in outs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(outs[0], other))
