"""The pre-aggregators NNM, Bucketing and ARC and their composition (robustagg/aggregators/pipeline.py)
against plainly written float64 versions of the papers' rules, plus the Pipeline's report mapping,
non-finite clients, weights, buffers, n' checks and argument errors."""
import math

import pytest
import torch
from aggregator_formulas import X64, close, fedavg_ref, rand_G, trimmed_ref
from conftest import DEVICE

import robustagg
from robustagg import aggregators as A
from robustagg.aggregators.pipeline import ARC, NNM, Bucketing, Pipeline


# ---------------------------------------------------------------- float64 paper formulas

def nnm_ref(G, f):
    """Allouah et al. 2023: row i -> mean of its n - f nearest rows (itself included), found by a
    Python sort on (distance, index), so ties go to the lower index."""
    n = G.shape[0]
    out = torch.empty_like(G)
    for i in range(n):
        dist = [float((G[j] - G[i]).norm()) for j in range(n)]
        nearest = sorted(range(n), key=lambda j: (dist[j], j))[:n - f]
        out[i] = sum(G[j] / (n - f) for j in nearest)
    return out


def bucketing_ref(G, order, s):
    """Karimireddy et al. 2022, Alg. 1, with the permutation given: means of consecutive s-blocks."""
    return torch.stack([G[order[start:start + s]].mean(0) for start in range(0, len(order), s)])


def scaled_norms(G):
    """Row norms that do not overflow for 1e300 rows: the largest magnitude factored out."""
    top = G.abs().amax(dim=1, keepdim=True).clamp_min(1e-300)
    return top.squeeze(1) * (G / top).norm(dim=1)


def arc_ref(G, f):
    """Allouah et al. 2024, Alg. 1: clip the k = floor(2 f (n - f) / n) largest norms to the
    (k+1)-th largest."""
    n = G.shape[0]
    k = math.floor(2 * f * (n - f) / n)
    norms = scaled_norms(G)
    order = sorted(range(n), key=lambda i: -float(norms[i]))
    out = G.clone()
    C = float(norms[order[k]])
    for i in order[:k]:
        if norms[i] > C:
            out[i] = G[i] * (C / norms[i])
    return out


def on_device(X):
    return X.to(DEVICE)


CASES = ["random", "one_far", "ties"]


def inputs(case, n, d, seed=0, dtype=torch.float64):
    G = X64(rand_G(n, d, seed))
    if case == "one_far":
        G[n // 2] = 1e30
    elif case == "ties":
        G = G.sign()          # entries in {-1, 0, 1}: many equal distances and norms
        G[1] = G[0]
    return on_device(G.to(dtype))


SIZES = [(3, 4), (5, 7), (8, 16), (13, 9), (20, 33)]


# ---------------------------------------------------------------- NNM

@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("n,d", SIZES)
def test_nnm_matches_formula(case, n, d):
    G = inputs(case, n, d)
    for f in sorted({0, 1, (n - 1) // 2, n - 1}):
        close(NNM(f)(G), nnm_ref(X64(G), f))


def test_nnm_ties_go_to_the_lower_index():
    # 1-D points 0, 1, -1, 5 with f = 2 (two neighbours): 0's nearest are itself and then 1 and -1
    # at distance 1; the lower index (1) wins, so row 0 -> (0 + 1) / 2. Row 3 (5): itself and 1.
    G = on_device(torch.tensor([[0.0], [1.0], [-1.0], [5.0]], dtype=torch.float64))
    pre = NNM(2)
    assert pre(G).flatten().tolist() == [0.5, 0.5, -0.5, 3.0]
    assert pre.last_report.neighbours.tolist() == [[0, 1], [1, 0], [2, 0], [3, 1]]


def test_nnm_keeps_a_far_row_out_of_its_non_neighbours_exactly():
    # f = 1: the far row is nobody's neighbour but its own; the other rows' means are those of
    # the honest rows alone, bit for bit with the formula on the honest rows.
    G = inputs("random", 7, 5)
    G[6] = 3e38
    out = NNM(1)(G)
    close(out[:6], nnm_ref(X64(G[:6]), 0))
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("dtype,big", [(torch.float32, 3e38), (torch.float64, 1e300)])
def test_nnm_huge_rows_stay_finite(dtype, big):
    # Every entry near the dtype's top: the mixing product scales each term by 1/(n - f) before
    # summing, so the means of equal-signed huge rows do not overflow (their exact value is finite).
    G = on_device(torch.full((6, 8), big, dtype=dtype))
    G[1] *= 0.5
    G[4] = -big
    out = NNM(2)(G)
    assert torch.isfinite(out).all()
    close(out, nnm_ref(X64(G), 2), dtype=dtype)
    full = on_device(torch.full((5, 3), torch.finfo(dtype).max, dtype=dtype))
    assert torch.isfinite(NNM(2)(full)).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_nnm_low_precision(dtype):
    G = inputs("random", 8, 16, dtype=dtype)
    out = NNM(3)(G)
    assert out.dtype == dtype
    close(out, nnm_ref(X64(G), 3), dtype=dtype, scale=4)


def test_nnm_drops_a_nan_row_and_raises_on_request():
    G = inputs("random", 8, 6)
    G[2, 3] = float("nan")
    rest = torch.cat([G[:2], G[3:]])
    pre = NNM(2)
    close(pre(G), nnm_ref(X64(rest), 2))
    assert pre.last_report.rejected_nonfinite == [2]
    assert pre.last_report.selected == [0, 1, 3, 4, 5, 6, 7]
    with pytest.raises(robustagg.NonFiniteUpdateError) as info:
        pre(G, nonfinite="raise")
    assert info.value.clients == [2]


# ---------------------------------------------------------------- Bucketing

@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("n,d", SIZES)
@pytest.mark.parametrize("s", [1, 2, 3, 25])
def test_bucketing_matches_formula_on_its_draw(case, n, d, s):
    G = inputs(case, n, d)
    pre = Bucketing(s, seed=n)
    out = pre(G)
    buckets = pre.last_report.buckets
    order = [i for bucket in buckets for i in bucket]
    assert sorted(order) == list(range(n))                                   # a permutation
    assert [len(b) for b in buckets] == [min(s, n - start) for start in range(0, n, s)]  # last one smaller
    close(out, bucketing_ref(X64(G), order, s))


def test_bucketing_draws_from_its_generator():
    G = inputs("random", 12, 3)
    draws = [Bucketing(2, seed=7)(G) for _ in range(2)]
    assert torch.equal(draws[0], draws[1])                                    # seeded: repeats
    same = Bucketing(2, generator=torch.Generator().manual_seed(7))(G)
    assert torch.equal(same, draws[0])
    pre = Bucketing(2, seed=7)
    first, second = pre(G), pre(G)                                            # the stream moves on
    assert not torch.equal(first, second)
    # every order is reachable: over 200 draws of 3 clients in buckets of 1, all 6 orders appear
    pre = Bucketing(1, seed=0)
    orders = {tuple(b[0] for b in (pre(G[:3]), pre.last_report.buckets)[1]) for _ in range(200)}
    assert len(orders) == 6


def test_bucketing_hand_case():
    # n = 5, s = 2, permutation fixed through the report: buckets of 2, 2, 1; the last bucket is
    # its single member (its mean, not half of it).
    G = on_device(torch.tensor([[0.0], [2.0], [4.0], [6.0], [8.0]], dtype=torch.float64))
    pre = Bucketing(2, seed=3)
    out = pre(G).flatten().tolist()
    buckets = pre.last_report.buckets
    assert out == [sum(2.0 * i for i in b) / len(b) for b in buckets]
    assert out[-1] == 2.0 * buckets[-1][0]


def test_bucketing_drops_a_nan_row_from_the_same_draw():
    # A NaN row makes its bucket's mean NaN; the rows are then screened and the buckets formed
    # again from the same order without the NaN client.
    G = inputs("random", 9, 4)
    G[5, 0] = float("nan")
    pre = Bucketing(2, seed=1)
    out = pre(G)
    clean = Bucketing(2, seed=1)
    clean(on_device(torch.zeros(9, 4, dtype=torch.float64)))
    order = [i for b in clean.last_report.buckets for i in b if i != 5]
    assert [i for b in pre.last_report.buckets for i in b] == order
    close(out, bucketing_ref(X64(G), order, 2))
    assert pre.last_report.rejected_nonfinite == [5]


@pytest.mark.parametrize("dtype,big", [(torch.float32, 3e38), (torch.float64, 1e300)])
def test_bucketing_huge_rows_stay_finite(dtype, big):
    G = on_device(torch.full((7, 5), big, dtype=dtype))
    G[2] = -big
    pre = Bucketing(3, seed=0)
    out = pre(G)
    assert torch.isfinite(out).all()
    order = [i for b in pre.last_report.buckets for i in b]
    close(out, bucketing_ref(X64(G), order, 3), dtype=dtype)


# ---------------------------------------------------------------- ARC

@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("n,d", SIZES)
def test_arc_matches_formula(case, n, d):
    G = inputs(case, n, d)
    for f in sorted({0, 1, n // 3, n // 2, n}):
        pre = ARC(f)
        close(pre(G), arc_ref(X64(G), f))
        assert pre.last_report.k == 2 * f * (n - f) // n


def test_arc_hand_case():
    # Norms 1, 2, 3, 4, 5 (n = 5), f = 1: k = floor(2 * 1/5 * 4) = 1, so the largest (5) is clipped
    # to the second largest (4); f = 2: k = floor(2 * 2/5 * 3) = 2, the two largest to 3.
    G = on_device(torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0], [0.0, 4.0], [3.0, 4.0]], dtype=torch.float64))
    pre = ARC(1)
    close(pre(G)[4], torch.tensor([2.4, 3.2], dtype=torch.float64))
    assert pre.last_report.clipped == [4] and pre.last_report.threshold == 4.0
    pre = ARC(2)
    out = pre(G)
    close(out[3:], torch.tensor([[0.0, 3.0], [1.8, 2.4]], dtype=torch.float64))
    assert pre.last_report.clipped == [3, 4]


def test_arc_ties_leave_rows_at_the_threshold_alone():
    # Norms 1, 2, 2, 2 with f = 1: k = 1 and the 2nd largest norm is 2, so no row changes,
    # whichever of the tied rows counts as the largest.
    G = on_device(torch.tensor([[1.0], [2.0], [-2.0], [2.0]], dtype=torch.float64))
    pre = ARC(1)
    assert torch.equal(pre(G), G)
    assert pre.last_report.clipped == []


@pytest.mark.parametrize("dtype,big", [(torch.float32, 3e38), (torch.float64, 1e300)])
def test_arc_one_huge_row_is_clipped_to_the_honest_scale(dtype, big):
    G = inputs("random", 9, 6, dtype=dtype)
    G[4] = big
    out = ARC(1)(G)
    assert torch.isfinite(out).all()
    honest = X64(torch.cat([G[:4], G[5:]])).norm(dim=1)
    assert float(X64(out[4]).norm()) <= float(honest.max()) * (1 + 1e-5)
    close(out, arc_ref(X64(G), 1), dtype=dtype)


def test_arc_drops_a_nan_row():
    G = inputs("random", 8, 5)
    G[0] = float("inf")
    pre = ARC(2)
    close(pre(G), arc_ref(X64(G[1:]), 2))
    assert pre.last_report.rejected_nonfinite == [0]


# ---------------------------------------------------------------- Pipeline

def test_pipeline_is_the_final_rule_on_the_stage_output():
    G = inputs("random", 10, 7)
    for pre, final, ref in [
        (NNM(2), A.TrimmedMean(trim=2), lambda X: trimmed_ref(nnm_ref(X, 2), 2)),
        (ARC(3), A.FedAvg(), lambda X: arc_ref(X, 3).mean(0)),
    ]:
        close(Pipeline(pre, final)(G), ref(X64(G)))
    # two stages: ARC then NNM then the trimmed mean
    close(Pipeline(ARC(2), NNM(2), A.TrimmedMean(trim=1))(G), trimmed_ref(nnm_ref(arc_ref(X64(G), 2), 2), 1))


def test_pipeline_report_maps_buckets_to_their_members():
    # Krum picks one bucket; the pipeline's selected are that bucket's members, sorted.
    G = inputs("random", 12, 6)
    G[3] = 1e6
    agg = Pipeline(Bucketing(2, seed=4), A.Krum(f=1))
    out = agg(G)
    report = agg.last_report
    buckets = report.stages[0].buckets
    (chosen,) = report.final.selected
    assert report.selected == sorted(buckets[chosen])
    assert report.sources == [sorted(b) for b in buckets]
    assert 3 not in report.selected
    close(out, G[buckets[chosen]].mean(0))
    # identity stages: the selected rows are the clients
    agg = Pipeline(NNM(1), A.MultiKrum(f=1, m=3))
    agg(G)
    assert agg.last_report.selected == agg.last_report.final.selected
    # a rule that does not select: every client that was not rejected
    agg = Pipeline(Bucketing(3), A.CoordinateMedian())
    agg(G)
    assert agg.last_report.selected == list(range(12))


def test_pipeline_chains_bucket_members_through_two_stages():
    G = inputs("random", 12, 3)
    agg = Pipeline(Bucketing(2, seed=0), Bucketing(2, seed=1), A.Krum(f=0))
    agg(G)
    first, second = (r.buckets for r in agg.last_report.stages)
    (chosen,) = agg.last_report.final.selected
    assert agg.last_report.selected == sorted(c for row in second[chosen] for c in first[row])


@pytest.mark.parametrize("pre", [NNM(2), Bucketing(2, seed=0), ARC(2)], ids=repr)
def test_pipeline_screens_a_nan_client_in_the_first_stage(pre):
    G = inputs("random", 10, 5)
    G[7, 2] = float("nan")
    agg = Pipeline(pre, A.TrimmedMean(trim=1))
    out = agg(G)
    assert torch.isfinite(out).all()
    assert agg.last_report.rejected_nonfinite == [7]
    assert agg.last_report.stages[0].rejected_nonfinite == [7]
    assert 7 not in {c for row in agg.last_report.sources for c in row}
    with pytest.raises(robustagg.NonFiniteUpdateError):
        Pipeline(pre, A.TrimmedMean(trim=1), nonfinite="raise")(G)


def test_pipeline_nan_client_matches_the_pipeline_on_the_rest():
    G = inputs("random", 9, 4)
    G[0] = float("nan")
    close(Pipeline(NNM(2), A.TrimmedMean(trim=2))(G), Pipeline(NNM(2), A.TrimmedMean(trim=2))(G[1:]))


def test_pipeline_checks_n_after_each_stage():
    G = inputs("random", 10, 3)
    with pytest.raises(ValueError, match=r"Bucketing\(s=2\) hands n'=5 rows to Krum: .*f=2 is too large for n=5"):
        Pipeline(Bucketing(2), A.Krum(f=2))(G)
    Pipeline(Bucketing(2), A.Krum(f=1))(G)   # 5 >= 2*1 + 3
    # after a drop: 7 finite rows -> 4 buckets, too few for Krum(f=1)
    G[:3] = float("nan")
    with pytest.raises(ValueError, match="n'=4 rows to Krum"):
        Pipeline(Bucketing(2), A.Krum(f=1))(G)
    with pytest.raises(ValueError, match=r"NNM: f=10 leaves no neighbour for n=10"):
        Pipeline(NNM(10), A.FedAvg())(inputs("random", 10, 3))
    with pytest.raises(ValueError, match=r"ARC: f=11 exceeds n=10"):
        Pipeline(ARC(11), A.FedAvg())(inputs("random", 10, 3))


def test_pipeline_argument_errors():
    with pytest.raises(TypeError, match="needs at least a final aggregator"):
        Pipeline()
    with pytest.raises(TypeError, match="the last stage must be an Aggregator.*NNM"):
        Pipeline(NNM(1))
    with pytest.raises(TypeError, match="stage 1 must be a pre-aggregator.*can only come last"):
        Pipeline(NNM(1), A.Krum(f=1), A.FedAvg())
    with pytest.raises(TypeError, match="stage 0 must be a pre-aggregator"):
        Pipeline(lambda G: G, A.FedAvg())
    for make, arg in [(lambda: NNM(-1), "f"), (lambda: ARC(1.5), "f"), (lambda: Bucketing(0), "s")]:
        with pytest.raises((TypeError, ValueError), match=arg):
            make()
    with pytest.raises(TypeError, match="generator"):
        Bucketing(2, generator=3)
    with pytest.raises(ValueError, match="nonfinite"):
        Pipeline(NNM(1), A.FedAvg(), nonfinite="ignore")


def test_pipeline_weights():
    G = inputs("random", 10, 4)
    w = torch.arange(1.0, 11.0, dtype=torch.float64)
    # Bucketing then FedAvg: buckets are weighted means with their total weight, so the whole is FedAvg
    agg = Pipeline(Bucketing(3, seed=2), A.FedAvg())
    assert agg.uses_weights
    close(agg(G, weights=w), fedavg_ref(X64(G), w))
    # NNM and ARC hand each client's weight to its own row
    close(Pipeline(NNM(2), A.FedAvg())(G, weights=w), fedavg_ref(nnm_ref(X64(G), 2), w))
    close(Pipeline(ARC(2), A.FedAvg())(G, weights=w), fedavg_ref(arc_ref(X64(G), 2), w))
    # a final rule that ignores weights: the buckets are plain means, whatever the weights
    agg = Pipeline(Bucketing(3, seed=2), A.TrimmedMean(trim=1))
    assert not agg.uses_weights
    out = agg(G, weights=w)
    order = [i for b in agg.last_report.stages[0].buckets for i in b]
    close(out, trimmed_ref(bucketing_ref(X64(G), order, 3), 1))


def test_pipeline_settings_default_to_the_final_aggregator():
    final = A.Krum(f=1, nonfinite="raise", buffers="kept_mean")
    agg = Pipeline(NNM(1), final)
    assert (agg.nonfinite, agg.buffers, agg.uses_weights) == ("raise", "kept_mean", False)
    assert Pipeline(NNM(1), A.TrimmedMean(trim=1)).buffers == "rule"
    assert Pipeline(NNM(1), final, nonfinite="drop").nonfinite == "drop"
    assert repr(Pipeline(NNM(4), Bucketing(2), A.FedAvg())) == "Pipeline(NNM(f=4), Bucketing(s=2), FedAvg())"


def test_pipeline_state_dict_updates_round_trip():
    # A list of state_dicts with BatchNorm-style buffers and an integer counter: the floating
    # weights come back as the pipeline on the stacked matrix; running_mean (held out under
    # "kept_median") as the median over the selected clients; the counter as the exact median.
    g = torch.Generator().manual_seed(0)
    states = [{"w": torch.randn(3, 2, generator=g, dtype=torch.float64),
               "bn.running_mean": torch.randn(2, generator=g, dtype=torch.float64),
               "bn.num_batches_tracked": torch.tensor(i)} for i in range(9)]
    states[4]["w"] = states[4]["w"] * 1e6
    agg = Pipeline(Bucketing(2, seed=0), A.MultiKrum(f=1, m=2))
    out = agg(states)
    G = torch.stack([s["w"].flatten() for s in states])
    twin = Pipeline(Bucketing(2, seed=0), A.MultiKrum(f=1, m=2))
    close(out["w"].flatten(), twin(G))
    kept = agg.last_report.selected
    assert kept == twin.last_report.selected and 4 not in kept
    kept_means = torch.stack([states[i]["bn.running_mean"] for i in kept])
    close(out["bn.running_mean"], torch.quantile(kept_means, 0.5, dim=0))   # numpy-style median
    assert out["bn.num_batches_tracked"].dtype == torch.int64
    assert int(out["bn.num_batches_tracked"]) == sorted(kept)[(len(kept) - 1) // 2]
    assert out["w"].shape == (3, 2)


def test_pipeline_state_is_the_final_aggregators():
    G = inputs("random", 6, 4)
    agg = Pipeline(ARC(1), A.CenteredClipping(tau=1.0))
    first = agg(G)
    state = agg.state_dict()
    close(state["center"], first)
    again = Pipeline(ARC(1), A.CenteredClipping(tau=1.0))
    again.load_state_dict(state)
    close(again(G), agg(G))
