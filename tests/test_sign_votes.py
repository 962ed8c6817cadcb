"""sign_sum, sign_agreement and rlr (docs/ops.md) on every backend, against the reference."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from robustagg import NonFiniteUpdateError, ops, reference
from conftest import BAD, DEVICE, DTYPES, assert_close, backends_for, to_reference, with_bad_rows

NS = [1, 2, 3, 5, 20, 33, 64, 100, 257]
# 1, 7, primes, and the CPU vector (16 floats, 8 doubles) and chunk (256 vectors) sizes +-1
DS = [1, 7, 15, 16, 17, 101, 4095, 4096, 4097, 8191]


def make_G(n, d, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=gen, dtype=torch.float64).to(device=DEVICE, dtype=dtype)


# ---------------------------------------------------------------- sign_sum

@pytest.mark.parametrize("backend", backends_for("sign_sum"))
@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("d", DS)
def test_sign_sum_matches_reference(backend, n, d):
    G = make_G(n, d, seed=n * 31 + d)
    G[:, 3::7] = 0.0  # zero votes, some of them from -0.0
    G[0, 3::14] = -0.0
    out = ops.sign_sum(G, backend=backend)
    assert out.dtype == torch.int32 and out.shape == (d,)
    assert torch.equal(out.cpu(), reference.sign_sum(G.cpu()))


@pytest.mark.parametrize("backend", backends_for("sign_sum"))
@pytest.mark.parametrize("dtype", DTYPES)
def test_sign_sum_every_dtype(backend, dtype):
    G = make_G(20, 1031, dtype=dtype, seed=3)
    assert torch.equal(ops.sign_sum(G, backend=backend).cpu(), reference.sign_sum(G.cpu()))


@pytest.mark.parametrize("backend", backends_for("sign_sum"))
@pytest.mark.parametrize("dtype", DTYPES)
def test_sign_of_signed_zero_is_zero(backend, dtype):
    G = torch.tensor([[0.0, -0.0, 1.0], [-0.0, -0.0, -2.0], [-0.0, 0.0, 0.0]], device=DEVICE, dtype=dtype)
    assert ops.sign_sum(G, backend=backend).tolist() == [0, 0, 0]


@pytest.mark.parametrize("backend", backends_for("sign_sum"))
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_sign_of_subnormals_and_huge_values(backend, dtype):
    tiny, big = torch.finfo(dtype).tiny / 4, torch.finfo(dtype).max
    G = torch.tensor([[tiny, -tiny, big], [tiny, -big, big], [-tiny, -tiny, -big]], device=DEVICE, dtype=dtype)
    assert ops.sign_sum(G, backend=backend).tolist() == [1, -3, 1]


@pytest.mark.parametrize("backend", backends_for("sign_sum"))
def test_sign_sum_all_agree_gives_plus_minus_n(backend):
    G = torch.cat([torch.ones(257, 5), -torch.ones(257, 5)], dim=1).to(DEVICE)
    assert ops.sign_sum(G, backend=backend).tolist() == [257] * 5 + [-257] * 5


@pytest.mark.parametrize("backend", backends_for("sign_sum"))
def test_sign_agreement_is_abs_votes_over_n(backend):
    G = make_G(20, 333, seed=2)
    G[:, :5] = G[:, :5].abs()  # unanimous columns
    expected = reference.sign_sum(G.cpu()).abs().float() / 20
    out = ops.sign_agreement(G, backend=backend)
    assert torch.equal(out.cpu(), expected)
    assert torch.equal(out[:5].cpu(), torch.ones(5))


@pytest.mark.parametrize("backend", backends_for("sign_sum"))
def test_sign_sum_nonfinite_policies(backend):
    G = with_bad_rows(make_G(9, 40), BAD)
    with pytest.raises(NonFiniteUpdateError) as info:
        ops.sign_sum(G, backend=backend)
    assert info.value.clients == [1, 4, 6]
    finite = G[[0, 2, 3, 5, 7, 8]]
    dropped = ops.sign_sum(G, nonfinite="drop", backend=backend)
    assert torch.equal(dropped, ops.sign_sum(finite, backend=backend))
    assert torch.equal(dropped.cpu(), reference.sign_sum(finite.cpu()))
    assert torch.equal(ops.sign_agreement(G, nonfinite="drop", backend=backend),
                       reference.sign_agreement(finite.cpu()).to(DEVICE))
    clean = [j for j in range(40) if j not in (1, 4, 6)]
    out = ops.sign_sum(G, nonfinite="propagate", backend=backend)
    assert torch.equal(out[clean].cpu(), reference.sign_sum(G.cpu())[clean])


@pytest.mark.parametrize("backend", backends_for("sign_sum"))
def test_sign_sum_flags_rows_anywhere_in_the_row(backend):
    G = make_G(6, 5000)
    G[0, 0] = float("nan")
    G[2, 4999] = float("inf")  # the partial last vector of the last chunk
    G[5, 4096] = float("-inf")  # the first value of the second chunk
    _, bad = robustagg_kernel("sign_sum", backend)(G)
    assert bad.tolist() == [True, False, True, False, False, True]


def robustagg_kernel(op, backend):
    from robustagg import _backend
    return _backend.raw_op(op, backend)


@pytest.mark.parametrize("backend", backends_for("sign_sum"))
def test_sign_sum_non_contiguous_and_deterministic(backend):
    G = make_G(33, 40_002, seed=4)[:, ::2]
    assert not G.is_contiguous()
    first = ops.sign_sum(G, backend=backend)
    assert torch.equal(first.cpu(), reference.sign_sum(G.cpu()))
    assert torch.equal(first, ops.sign_sum(G, backend=backend))


# ---------------------------------------------------------------- rlr

def rlr_expected(G, theta, weights=None, server_lr=1.0):
    return reference.rlr(to_reference(G), theta, None if weights is None else weights.double().cpu(), server_lr)


@pytest.mark.parametrize("backend", backends_for("rlr"))
@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("d", [1, 7, 17, 4097])
def test_rlr_matches_reference(backend, n, d):
    G = make_G(n, d, seed=n + d) + 0.2
    for theta in sorted({0, n // 2, n}):
        assert_close(ops.rlr(G, theta, backend=backend), rlr_expected(G, theta), G.dtype)


@pytest.mark.parametrize("backend", backends_for("rlr"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weighted", [False, True])
def test_rlr_every_dtype_with_and_without_weights(backend, dtype, weighted):
    n = 20
    G = make_G(n, 4095, dtype=dtype, seed=5)  # two or more column blocks of the Triton kernels, the last partial
    weights = torch.arange(1, n + 1, dtype=torch.float64) * 37 if weighted else None  # sample counts
    out = ops.rlr(G, 8, weights, server_lr=0.5, backend=backend)
    assert out.dtype == dtype
    assert_close(out, rlr_expected(G, 8, weights, 0.5), dtype)


@pytest.mark.parametrize("backend", backends_for("rlr"))
def test_rlr_unit_weights_equal_no_weights(backend):
    G = make_G(20, 999, seed=6)
    assert torch.equal(ops.rlr(G, 4, torch.ones(20), backend=backend), ops.rlr(G, 4, backend=backend))


@pytest.mark.parametrize("backend", backends_for("rlr"))
def test_rlr_zero_weight_ignores_a_huge_client(backend):
    G = make_G(5, 64, seed=7)
    G[2] = 3e38
    weights = torch.tensor([1.0, 2.0, 0.0, 1.0, 1.0])
    expected = rlr_expected(G, 0, weights)
    assert torch.isfinite(expected).all()
    assert_close(ops.rlr(G, 0, weights, backend=backend), expected, G.dtype)


@pytest.mark.parametrize("backend", backends_for("rlr"))
def test_rlr_theta_boundary_flips_the_sign(backend):
    # column j: j + 1 of 5 clients positive (votes 2j - 3), so |votes| = 3, 1, 1, 3, 5
    n = 5
    G = -torch.ones(n, 5, device=DEVICE)
    for j in range(5):
        G[: j + 1, j] = 2.0
    avg = G.double().mean(0).cpu()
    for theta in range(n + 1):
        votes = reference.sign_sum(G.cpu()).abs()
        lr = torch.where(votes >= theta, 1.0, -1.0).double()
        assert_close(ops.rlr(G, theta, backend=backend), lr * avg, G.dtype)


@pytest.mark.parametrize("backend", backends_for("rlr"))
def test_rlr_nonfinite_policies(backend):
    G = with_bad_rows(make_G(9, 40), BAD)
    weights = torch.arange(1.0, 10.0)
    with pytest.raises(NonFiniteUpdateError) as info:
        ops.rlr(G, 3, weights, backend=backend)
    assert info.value.clients == [1, 4, 6]
    kept = [0, 2, 3, 5, 7, 8]
    dropped = ops.rlr(G, 3, weights, nonfinite="drop", backend=backend)
    assert torch.equal(dropped, ops.rlr(G[kept], 3, weights[kept], backend=backend))
    assert_close(dropped, rlr_expected(G[kept], 3, weights[kept]), G.dtype)
    with pytest.raises(ValueError, match=r"theta=7.*n'=6.*n=9"):
        ops.rlr(G, 7, nonfinite="drop", backend=backend)
    clean = [j for j in range(40) if j not in (1, 4, 6)]
    out = ops.rlr(G, 3, nonfinite="propagate", backend=backend)
    assert_close(out[clean], rlr_expected(G, 3)[clean], G.dtype)


@pytest.mark.parametrize("backend", backends_for("rlr"))
def test_rlr_non_contiguous_and_deterministic(backend):
    G = make_G(20, 60_000, seed=8)[:, 1::3]
    first = ops.rlr(G, 10, torch.rand(20, generator=torch.Generator().manual_seed(0)), backend=backend)
    assert torch.equal(first, ops.rlr(G, 10, torch.rand(20, generator=torch.Generator().manual_seed(0)),
                                      backend=backend))


# ---------------------------------------------------------------- properties, opcheck

@st.composite
def vote_problems(draw):
    n = draw(st.integers(1, 30))
    d = draw(st.integers(1, 50))
    values = draw(st.lists(st.one_of(st.floats(-2.0 ** 20, 2.0 ** 20, width=32), st.just(0.0),
                                     st.just(-0.0)), min_size=n * d, max_size=n * d))
    return torch.tensor(values, dtype=torch.float32).reshape(n, d)


@pytest.mark.parametrize("backend", backends_for("sign_sum"))
@settings(max_examples=60, deadline=None)
@given(G=vote_problems())
def test_sign_sum_property_matches_reference(backend, G):
    assert torch.equal(ops.sign_sum(G.to(DEVICE), backend=backend).cpu(), reference.sign_sum(G))


@pytest.mark.parametrize("backend", backends_for("rlr"))
@settings(max_examples=60, deadline=None)
@given(G=vote_problems(), data=st.data())
def test_rlr_property_matches_reference(backend, G, data):
    n = G.shape[0]
    theta = data.draw(st.integers(0, n))
    weights = torch.tensor(data.draw(st.lists(st.floats(0.5, 100), min_size=n, max_size=n)))
    out = ops.rlr(G.to(DEVICE), theta, weights, server_lr=0.1, backend=backend)
    expected = rlr_expected(G, theta, weights, 0.1)
    # recursive float32 summation of n products: |error| <= (n + 1) 2^-24 sum_i |w_i x_i| (+ the division)
    magnitude = (G.double().abs() * weights.double()[:, None]).sum(0) / weights.double().sum() * 0.1
    bound = magnitude * (n + 2) * 2.0 ** -23 + 1e-44
    assert ((out.double().cpu() - expected).abs() <= bound).all()


@pytest.mark.skipif(DEVICE.type != "cpu", reason="opcheck of the CPU registrations")
@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck_sign_sum_and_rlr(dtype):
    G = make_G(20, 37, dtype=dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    torch.library.opcheck(torch.ops.robustagg.sign_sum.default, (G,))
    torch.library.opcheck(torch.ops.robustagg.rlr.default, (G, None, 10, 1.0))
    torch.library.opcheck(torch.ops.robustagg.rlr.default, (G, torch.rand(20, dtype=acc), 10, 0.5))
