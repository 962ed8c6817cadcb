"""closest_to_median_mean (Bulyan's coordinate step, docs/ops.md) on every backend, against the
float64 reference."""
import pytest
import torch

from robustagg import NonFiniteUpdateError, ops, reference
from conftest import DEVICE, DTYPES, assert_close, backends_for, to_reference, with_bad_rows

BACKENDS = backends_for("closest_to_median_mean")
# the CPU kernel's paths: compiled networks up to 20 and 32 rows, a network read from memory up
# to 2048 rows, heap sort beyond (which only the d=3 test below reaches)
NS = [1, 2, 3, 4, 5, 20, 21, 32, 33, 100, 257]


def betas(n):
    return sorted({1, max(1, n // 3), max(1, n - 2), n})


def bulyan_betas(n):
    """The betas Bulyan uses: beta = n - 2f, of n's parity. For an even n and an odd beta the two
    middle values are always equally near the median, and then the rounding of their distances in
    the arithmetic dtype decides between them, as in the reference run in that dtype."""
    return [beta for beta in betas(n) if (n - beta) % 2 == 0]


def grid(n, d, seed, dtype=torch.float32):
    """Multiples of 1/8 in [-5, 5]: exact in every dtype, with many exact ties in distance, and a
    median that is exact too, so every dtype and the float64 reference pick the same values."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(-40, 41, (n, d), generator=g).double() / 8).to(device=DEVICE, dtype=dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", NS)
def test_matches_reference_on_continuous_values(backend, n):
    if backend == "triton" and n > 256:
        pytest.skip("the interpreted radix-select path is slow: test_large_n_and_awkward_d covers it")
    g = torch.Generator().manual_seed(n)
    for dtype in (torch.float32, torch.float64):
        G = torch.randn(n, 67, generator=g, dtype=torch.float64).to(device=DEVICE, dtype=dtype)
        for beta in bulyan_betas(n):
            out = ops.closest_to_median_mean(G, beta, backend=backend)
            assert out.shape == (67,) and out.dtype == dtype
            assert_close(out, reference.closest_to_median_mean(to_reference(G), beta), dtype)
        for beta in betas(n):   # the same arithmetic as the reference in G's dtype
            assert_close(ops.closest_to_median_mean(G, beta, backend=backend),
                         reference.closest_to_median_mean(G.cpu(), beta), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [5, 20, 30, 33, 64])
def test_ties_go_to_the_lower_row_in_every_dtype(backend, dtype, n):
    G = grid(n, 1031, seed=n, dtype=dtype)
    for beta in betas(n):
        assert_close(ops.closest_to_median_mean(G, beta, backend=backend),
                     reference.closest_to_median_mean(to_reference(G), beta), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_tie_in_distance_keeps_the_lower_row(backend):
    # median 0; beta = 2 keeps 0 and one of +-1 at distance 1: the one in the lower row.
    G = torch.tensor([[1.0], [-1.0], [0.0], [2.0], [-2.0]], device=DEVICE)
    assert ops.closest_to_median_mean(G, 2, backend=backend).item() == 0.5
    assert ops.closest_to_median_mean(G[[1, 0, 2, 3, 4]], 2, backend=backend).item() == -0.5
    # rows 0 and 1 tie with rows 2 and 3 at distance 1 from the median 0.5 of an even n
    H = torch.tensor([[-0.5], [1.5], [1.5], [-0.5], [0.5], [0.5]], device=DEVICE)
    assert ops.closest_to_median_mean(H, 3, backend=backend).item() == pytest.approx((0.5 + 0.5 + -0.5) / 3)
    # with rows=, the lower row is the one that comes first in the selection, not in G
    J = torch.tensor([[-1.0], [0.0], [1.0]], device=DEVICE)
    for rows, mean in [([0, 1, 2], -0.5), ([2, 1, 0], 0.5), ([1, 2, 0], 0.5)]:
        assert ops.closest_to_median_mean(J, 2, rows=rows, backend=backend).item() == mean, rows


@pytest.mark.parametrize("backend", BACKENDS)
def test_extreme_betas(backend):
    G = grid(9, 300, seed=3)
    # beta = n keeps everything: the plain mean; beta = 1 of an odd n keeps the median itself
    assert_close(ops.closest_to_median_mean(G, 9, backend=backend), to_reference(G).mean(dim=0), G.dtype)
    assert torch.equal(ops.closest_to_median_mean(G, 1, backend=backend), ops.median(G, backend=backend))
    assert torch.equal(ops.closest_to_median_mean(G[:1], 1, backend=backend), G[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_n_and_awkward_d(backend):
    G = grid(2100 if backend == "cpu" else 300, 3, seed=5)
    for beta in (1, G.shape[0] // 3):
        assert_close(ops.closest_to_median_mean(G, beta, backend=backend),
                     reference.closest_to_median_mean(to_reference(G), beta), G.dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_huge_values_stay_finite_and_cannot_steer(backend, dtype):
    big = 3e38 if dtype == torch.float32 else 1e300
    G = grid(11, 200, seed=7, dtype=dtype)
    # the median and the 5 nearest values of every column are huge: their mean is finite
    G[:6] = big
    out = ops.closest_to_median_mean(G, 5, backend=backend)
    assert torch.isfinite(out).all() and (out == big).all()
    # two attackers at +-big cannot move the result outside the honest values
    H = grid(11, 200, seed=8, dtype=dtype)
    H[0], H[1] = big, -big
    out = ops.closest_to_median_mean(H, 5, backend=backend)
    honest = H[2:]
    assert torch.isfinite(out).all()
    assert ((out >= honest.min(dim=0).values) & (out <= honest.max(dim=0).values)).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_signed_zeros(backend):
    G = torch.tensor([[-0.0, 0.0, -0.0], [0.0, -0.0, -0.0], [-0.0, 0.0, -0.0]], device=DEVICE)
    assert (ops.closest_to_median_mean(G, 2, backend=backend) == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_nonfinite_rows_raise_drop_and_propagate(backend):
    G = grid(9, 40, seed=11)
    bad = with_bad_rows(G)
    with pytest.raises(NonFiniteUpdateError) as info:
        ops.closest_to_median_mean(bad, 3, backend=backend)
    assert info.value.clients == [1, 4, 6]
    finite = bad[[0, 2, 3, 5, 7, 8]]
    assert torch.equal(ops.closest_to_median_mean(bad, 3, nonfinite="drop", backend=backend),
                       ops.closest_to_median_mean(finite, 3, backend=backend))
    with pytest.raises(ValueError, match=r"beta=5 .*\[1, 4\]"):  # beta counts the finite rows under drop
        ops.closest_to_median_mean(bad[:5], 5, nonfinite="drop", backend=backend)
    assert ops.closest_to_median_mean(bad, 3, nonfinite="propagate", backend=backend).shape == (40,)


@pytest.mark.parametrize("beta", [0, 10, -1, 2.5, True])
def test_bad_beta_names_the_argument_and_range(beta):
    G = grid(9, 4, seed=0)
    with pytest.raises((ValueError, TypeError), match="beta"):
        ops.closest_to_median_mean(G, beta)


def test_raw_op_rejects_bad_beta():
    G = grid(9, 4, seed=0).cpu()
    for beta in (0, 10):
        with pytest.raises(RuntimeError, match=r"beta=.* allowed \[1, 9\]"):
            torch.ops.robustagg.closest_to_median_mean(G, beta)
