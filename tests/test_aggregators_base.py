"""What every aggregator shares (robustagg/aggregators/base.py): structures in and out (state_dicts,
parameter lists, lower precision), non-finite clients, parameters that do not fit n, weights,
backend torch, and the benchmark's configurations."""
from collections import OrderedDict

import numpy as np
import pytest
import torch
from aggregator_formulas import X64, clipped, close, fedavg_ref, rand_G, trimmed_ref
from conftest import DEVICE

from robustagg import NonFiniteUpdateError, _backend
from robustagg import aggregators as A
from robustagg.layout import Layout


# ---------------------------------------------------------------- structures in and out

def state_dicts(n=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        out.append(OrderedDict([
            ("conv.weight", torch.randn(4, 2, 3, 3, generator=g)),
            ("conv.bias", torch.randn(4, generator=g)),
            ("bn.running_mean", torch.randn(4, generator=g)),
            ("bn.num_batches_tracked", torch.tensor(10 + i, dtype=torch.int64)),
            ("fc.weight", torch.randn(3, 8, generator=g, dtype=torch.float64)),
        ]))
    return out


def all_aggregators(root):
    return [A.FedAvg(), A.CoordinateMedian(), A.TrimmedMean(trim=1), A.SignSGD(), A.NormClipping(3.0),
            A.GeometricMedian(), A.CenteredClipping(3.0), A.Krum(1), A.MultiKrum(1, 3), A.MultiKrumCos(1),
            A.Bulyan(1), A.DnC(1, subsample_dim=20), A.InvariantAggregator(0.2), A.InvariantAggregator.official(),
            A.RobustLR(2), A.RobustLR(2, base="median", clip=5.0, noise=0.1), A.RobustLR(2, base="sign"),
            A.SparseFed(10, clip=5.0), A.SignGuard(), A.SignGuard(variant="sim"), A.SignGuard(variant="dist"),
            A.CosDen(3, 0.2), A.EuDen(3, 0.2, score="official"), A.MgDen(3, 0.2), A.FLTrust(root), A.FLTrustAmp(root),
            A.Meamed(1), A.MDA(1), A.MoNNA(1), A.CAF(1), A.SMEA(1), A.Pipeline(A.NNM(1), A.TrimmedMean(trim=1)),
            A.Pipeline(A.Bucketing(2, seed=0), A.Krum(1)), A.Pipeline(A.ARC(1), A.FedAvg())]


EVERY = range(len(all_aggregators(torch.zeros(1))))


@pytest.mark.parametrize("index", EVERY)
def test_state_dicts_come_back_with_the_same_keys_shapes_and_dtypes(index):
    sds = state_dicts(10)
    agg = all_aggregators(sds[0])[index]
    out = agg(sds)
    assert list(out) == list(sds[0])
    for key, value in sds[0].items():
        assert out[key].shape == value.shape and out[key].dtype == value.dtype, key
        assert bool(torch.isfinite(out[key].double()).all()), key


def test_state_dict_int64_buffer_is_the_exact_median():
    out = A.FedAvg()(state_dicts(4))
    assert out["bn.num_batches_tracked"].dtype == torch.int64
    assert out["bn.num_batches_tracked"].item() == 11   # lower median of 10..13, never through a float


def test_parameter_lists_and_vectors_come_back_as_given():
    g = torch.Generator().manual_seed(0)
    params = [[torch.randn(3, 4, generator=g), torch.randn(4, generator=g)] for _ in range(5)]
    out = A.CoordinateMedian()(params)
    assert isinstance(out, list) and [p.shape for p in out] == [(3, 4), (4,)]
    stacked = np.stack([torch.cat([p.reshape(-1) for p in ps]).numpy() for ps in params])
    expected = torch.from_numpy(np.median(stacked, 0))
    close(torch.cat([p.reshape(-1) for p in out]).double(), expected, torch.float32)
    vectors = [torch.randn(6, generator=g) for _ in range(5)]
    out = A.FedAvg()(vectors)
    assert out.shape == (6,)
    close(out, torch.stack(vectors).double().mean(0), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_lower_precision_inputs_match_the_float64_formula(dtype):
    G = rand_G(20, 100, dtype=dtype)
    X = X64(G)
    close(A.TrimmedMean(trim=3)(G), trimmed_ref(X, 3), dtype)
    close(A.FedAvg()(G), fedavg_ref(X), dtype)
    close(A.NormClipping(5.0)(G), fedavg_ref(clipped(X, 5.0)), dtype, scale=4)
    assert A.FedAvg()(G).dtype == dtype


# ---------------------------------------------------------------- non-finite clients

@pytest.mark.parametrize("index", EVERY)
def test_nonfinite_client_is_dropped_and_reported(index):
    G = rand_G(14, 60, seed=3)
    G[4, 7] = float("nan")
    G[11] = float("inf")
    agg = all_aggregators(G[0].clone())[index]
    if isinstance(agg, (A.CosDen, A.EuDen, A.MgDen, A.FLTrustAmp)):
        agg.layout = Layout.flat(6)
    out = agg(G)
    assert bool(torch.isfinite(out).all())
    assert agg.last_report.rejected_nonfinite == [4, 11]
    if agg.last_report.selected is not None:
        assert not {4, 11} & set(agg.last_report.selected)


@pytest.mark.parametrize("index", EVERY)
def test_nonfinite_drop_never_copies_the_kept_rows(index, monkeypatch):
    """After a client is dropped the ops read the kept rows of the caller's G in place: no op is
    ever handed a matrix of some of G's rows (only G itself, or one vector as a reference), and
    the coordinate-wise ops get the kept rows as ``rows``."""
    G = rand_G(14, 60, seed=3)
    G[4, 7] = float("nan")
    agg = all_aggregators(G[0].clone())[index]
    if isinstance(agg, A.Pipeline):
        pytest.skip("a pre-aggregator hands the next stage a new matrix of the kept rows by design")
    if isinstance(agg, (A.CosDen, A.EuDen, A.MgDen, A.FLTrustAmp)):
        agg.layout = Layout.flat(6)
    shapes, selections = [], []
    real = _backend.raw_op

    def spy(op, chosen):
        fn = real(op, chosen)

        def recorded(X, *args):
            shapes.append(tuple(X.shape))
            selections.extend(a.tolist() for a in args if isinstance(a, torch.Tensor) and a.dtype == torch.int64)
            return fn(X, *args)
        return recorded

    monkeypatch.setattr(_backend, "raw_op", spy)
    agg(G)
    assert agg.last_report.rejected_nonfinite == [4]
    assert {s[0] for s in shapes if len(s) == 2 and s[1] == 60} <= {14, 1}
    assert all(4 not in rows for rows in selections)


def test_nonfinite_drop_gives_the_same_result_as_removing_the_rows():
    G = rand_G(12, 40, seed=2)
    G[3, 0] = float("-inf")
    keep = [i for i in range(12) if i != 3]
    for make in (lambda: A.Krum(2), lambda: A.TrimmedMean(trim=2), lambda: A.GeometricMedian(),
                 lambda: A.SignGuard(seed=1), lambda: A.RobustLR(3, clip=4.0)):
        agg = make()
        out = agg(G)
        clean = make()
        expected = clean(G[keep])
        close(out, expected)
        if clean.last_report.selected is not None:
            assert agg.last_report.selected == [keep[i] for i in clean.last_report.selected]


def test_nonfinite_raise_names_the_clients():
    G = rand_G(8, 10)
    G[5, 2] = float("nan")
    with pytest.raises(NonFiniteUpdateError) as err:
        A.TrimmedMean(trim=1, nonfinite="raise")(G)
    assert err.value.clients == [5]
    with pytest.raises(NonFiniteUpdateError) as err:
        A.Krum(1, nonfinite="raise")(G)
    assert err.value.clients == [5]


def test_all_clients_nonfinite_is_a_clear_error():
    with pytest.raises(ValueError, match="no finite row"):
        A.FedAvg()(torch.full((3, 4), float("nan"), device=DEVICE))


# ---------------------------------------------------------------- state across rounds

@pytest.mark.parametrize("make, n, d", [(lambda: A.CenteredClipping(tau=1.0, iters=2), 8, 20),
                                        (lambda: A.SparseFed(k=5, clip=3.0), 6, 50)], ids=["CenteredClipping", "SparseFed"])
def test_state_dict_resumes_identically(make, n, d):
    G1, G2 = rand_G(n, d, seed=1), rand_G(n, d, seed=2)
    a = make()
    a(G1)
    b = make()
    b.load_state_dict(a.state_dict())
    assert torch.equal(a(G2), b(G2))
    assert not torch.equal(make()(G2), b(G2))   # the state matters


# ---------------------------------------------------------------- parameters that do not fit n

@pytest.mark.parametrize("make,n,match", [
    (lambda: A.Krum(3), 8, r"f=3 .*n >= 2f\+3"),
    (lambda: A.MultiKrum(1, m=9), 8, r"m=9 exceeds n=8"),
    (lambda: A.Bulyan(2), 10, r"f=2 .*n >= 4f\+3"),
    (lambda: A.TrimmedMean(trim=4), 8, r"trim=4 leaves nothing for n=8"),
    (lambda: A.TrimmedMean(alpha=0.5), 8, r"alpha=0.5 .*leaves nothing"),
    (lambda: A.InvariantAggregator(0.2, trim=3), 6, r"trim=3 leaves nothing"),
    (lambda: A.InvariantAggregator.official(), 5, r"empty for n=5"),
    (lambda: A.CosDen(k_nearest=9, malicious_frac=0.2), 8, r"k_nearest=9 exceeds n=8"),
    (lambda: A.EuDen(k_nearest=2, malicious_frac=1.0), 8, r"malicious_frac=1.0 keeps"),
    (lambda: A.RobustLR(theta=9), 8, r"theta=9 .*exceeds n=8"),
    (lambda: A.DnC(f=4, c=2.0), 8, r"removes 8 of n=8"),
])
def test_parameters_that_do_not_fit_n_are_clear_errors(make, n, match):
    with pytest.raises(ValueError, match=match):
        make()(rand_G(n, 12))


def test_nonfinite_drop_rechecks_parameters_on_the_survivors():
    G = rand_G(7, 5)
    G[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"f=2 is too large for n=6"):
        A.Krum(2)(G)


@pytest.mark.parametrize("make,match", [
    (lambda: A.TrimmedMean(), r"exactly one of trim"),
    (lambda: A.RobustLR(2, noise=1.0), r"noise=1.0 needs clip"),
    (lambda: A.NormClipping(0.0), r"max_norm=0.0 is out of range"),
    (lambda: A.SignGuard(variant="cos"), r"variant='cos'"),
    (lambda: A.Krum(-1), r"f=-1 is out of range"),
    (lambda: A.FedAvg(nonfinite="ignore"), r"nonfinite='ignore'"),
])
def test_bad_constructor_arguments_are_clear_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_weights_of_the_wrong_length_are_an_error():
    with pytest.raises(ValueError, match=r"weights has shape \(3,\); it must be \(4,\)"):
        A.FedAvg()(rand_G(4, 3), weights=[1.0, 2.0, 3.0])


def test_backend_torch_gives_the_same_aggregate():
    G = rand_G(14, 60, seed=3)
    for a, b in zip(all_aggregators(G[0].clone()), all_aggregators(G[0].clone())):
        if isinstance(a, (A.CosDen, A.EuDen, A.MgDen, A.FLTrustAmp)):
            a.layout = b.layout = Layout.flat(6)
        b.backend = "torch"
        close(a(G), b(G), scale=10)


# ---------------------------------------------------------------- the benchmark's configurations

def test_bench_make_aggregators_covers_every_rule_and_returns_d_vectors():
    from robustagg.bench.aggregators import make_aggregators

    layout = Layout.from_shapes([(10, 12), (12,), (4, 2, 3, 3), (16,)])
    G = rand_G(20, layout.d, dtype=torch.float32)
    aggs = make_aggregators(20, layout, G[:2].mean(0), backend=None)
    classes = {type(a) for a in aggs.values()} | {type(p) for a in aggs.values() for p in getattr(a, "pre", ())}
    rules = {getattr(A, name) for name in A.__all__
             if not name.endswith("Report") and name not in ("Aggregator", "PreAggregator")}
    assert rules <= classes
    for name, agg in aggs.items():
        out = agg(G)
        assert out.shape == (layout.d,) and bool(torch.isfinite(out).all()), name


def test_noise_is_drawn_in_chunks_so_that_a_column_shard_draws_its_own_part(monkeypatch):
    # a Clients over columns lo..hi of a d-column model (as robustagg.distributed makes them) draws
    # the same values as one process at those columns, across chunk boundaries
    from robustagg.aggregators import base
    monkeypatch.setattr(base, "NOISE_CHUNK", 8)

    class Shard(base.Clients):
        def __init__(self, G, lo, d):
            super().__init__(G, None, "drop", None)
            self.lo, self.model_d = lo, d

        @property
        def d(self):
            return self.model_d

    G = torch.zeros(2, 37, dtype=torch.float64)
    whole = base.Clients(G, None, "drop", None).gaussian(2.0, G[0], torch.Generator().manual_seed(5))
    for lo, hi in [(0, 8), (3, 20), (16, 17), (30, 37)]:
        part = Shard(G[:, lo:hi], lo, 37).gaussian(2.0, G[0, lo:hi], torch.Generator().manual_seed(5))
        assert torch.equal(part, whole[lo:hi]), (lo, hi)
    assert 1.0 < float(whole.std()) < 3.0

