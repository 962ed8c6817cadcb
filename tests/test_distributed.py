"""robustagg.distributed: sharded aggregation over gloo on 2 and 3 CPU ranks equals one process.

Each world size is one ``torch.multiprocessing.spawn`` that runs every case (tests/distributed_worker.py)
and hands back each rank's output slice and report. The tests put the slices together and compare
them with the same aggregator on the whole G in this process:

* coordinate-wise rules, bitwise;
* rules built on sums over the ranks (norms, distances, cosines), to float64 rounding, with the same
  selection and the same dropped clients;
* the reports, identical on every rank.

NCCL is not tested here (no GPU in CI).
"""
import dataclasses
import math

import pytest
import torch
import torch.multiprocessing as mp

import distributed_worker as W
from robustagg import aggregators as A
from robustagg.distributed import SHARDED, ShardedAggregator, shard_bounds
from robustagg.layout import Layout

# outputs bitwise equal to one process: coordinate-wise rules, and rules whose every decision is made
# from values that cross ranks exactly (DnC's sampled columns, SparseFed's top-k keys)
BITWISE = {"FedAvg", "CoordinateMedian", "TrimmedMean", "Meamed", "InvariantAggregator", "RobustLR",
           "RobustLR-median", "DnC", "SparseFed", "SparseFed-k20"}
# and their reports too, but for SparseFed's update_norm: a norm, summed over the ranks
EXACT_REPORTS = BITWISE - {"SparseFed", "SparseFed-k20"}
WORLDS = [2, 3]
TOLERANCE = {torch.float64: dict(rtol=1e-9, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-6)}


@pytest.fixture(scope="module", params=WORLDS, ids=lambda w: f"{w}ranks")
def spawned(request, tmp_path_factory):
    world = request.param
    tmp = tmp_path_factory.mktemp(f"dist{world}")
    path = str(tmp / "results.pt")
    mp.spawn(W.worker, args=(world, f"file://{tmp / 'init'}", path), nprocs=world, join=True)
    return world, torch.load(path, weights_only=False)


def single_process(name, kind):
    """The same rule on the whole G in this process: the outputs of its rounds and its reports."""
    G = W.inputs(kind)
    agg = W.rules(G[:3].mean(0))[name]()
    weights = W.WEIGHTS if agg.uses_weights else None
    outs, reports = [], []
    for _ in range(W.ROUNDS):
        outs.append(agg(G, weights))
        reports.append(agg.last_report)
    return outs, reports


CASES = [(name, kind) for kind in W.KINDS for name in W.rules(torch.zeros(W.D))]


def assert_reports_match(a, b, exact: bool, tol=None, where: str = "report"):
    """Two reports (or parts of them) agree: ints, bools, client lists and selections exactly, floats
    and float tensors bitwise when ``exact``, else within ``tol`` (float64 rounding by default)."""
    tol = tol or TOLERANCE[torch.float64]
    if dataclasses.is_dataclass(a):
        assert type(a) is type(b), where
        a, b = dataclasses.asdict(a), dataclasses.asdict(b)
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_reports_match(a[key], b[key], exact, tol, f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_reports_match(x, y, exact, tol, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        if exact or not a.is_floating_point():
            assert torch.equal(a, b), where
        else:
            torch.testing.assert_close(a, b, **tol, msg=where)
    elif isinstance(a, float) and not exact:
        assert math.isclose(a, b, rel_tol=tol["rtol"], abs_tol=tol["atol"]), (where, a, b)
    else:
        assert a == b, (where, a, b)


@pytest.mark.parametrize("name, kind", CASES)
def test_sharded_equals_one_process(spawned, name, kind):
    world, ranks = spawned
    outs, reports = single_process(name, kind)
    for r in range(W.ROUNDS):
        pieces = [ranks[rank]["cases"][(name, kind, r)] for rank in range(world)]
        out = torch.cat([value for value, _ in pieces])
        if name in BITWISE:
            assert torch.equal(out, outs[r]), (name, kind, r)
        else:
            torch.testing.assert_close(out, outs[r], **TOLERANCE[out.dtype])
        first = pieces[0][1]
        for _, report in pieces[1:]:
            assert_reports_match(report, first, exact=True, where="the reports of two ranks")
        assert_reports_match(first, reports[r], exact=name in EXACT_REPORTS, tol=TOLERANCE[out.dtype])
        if kind == "nan_in_last_shard":
            assert first.rejected_nonfinite == [4]


def test_scatter_updates_moves_whole_clients_to_column_shards(spawned):
    world, ranks = spawned
    G = W.inputs("random", torch.float32)
    order = ranks[0]["scatter_order"]
    for rank, (lo, hi) in enumerate(shard_bounds(W.D, world)):
        assert torch.equal(ranks[rank]["scatter"], G[order][:, lo:hi])


def test_every_rank_computes_the_same_bounds(spawned):
    world, ranks = spawned
    layout = Layout.from_shapes([(4, 3), (5,), (6, 2)])
    assert all(r["bounds_with_layout"] == shard_bounds(layout.d, world, layout) for r in ranks)


# ---------------------------------------------------------------- shard_bounds, in this process

@pytest.mark.parametrize("d, world", [(1, 1), (7, 2), (37, 3), (100, 7), (5, 5)])
def test_shard_bounds_are_even_contiguous_and_cover_d(d, world):
    bounds = shard_bounds(d, world)
    assert bounds[0][0] == 0 and bounds[-1][1] == d
    assert all(hi == lo for (_, hi), (lo, _) in zip(bounds, bounds[1:]))
    widths = [hi - lo for lo, hi in bounds]
    assert min(widths) >= 1 and max(widths) - min(widths) <= 1


def test_shard_bounds_keep_pooling_windows_on_one_rank():
    # a (10, 6) weight (60 values, pooled in 2-row groups of 12), then a bias of 8 and a (4, 5) weight
    layout = Layout.from_shapes([(10, 6), (8,), (4, 5)])
    for world in (2, 3, 4):
        for lo, hi in shard_bounds(layout.d, world, layout, kernel=2)[1:]:
            assert lo % 12 == 0 if lo < 60 else (60 <= lo <= 68 or (lo - 68) % 10 == 0)
    # 88 columns over 2 ranks: the even cut 44 is inside the first weight; 48 is the nearest 2-row boundary
    assert shard_bounds(layout.d, 2, layout) == [(0, 48), (48, 88)]


def test_shard_bounds_name_bad_arguments():
    with pytest.raises(ValueError, match="world_size"):
        shard_bounds(3, 4)
    with pytest.raises(ValueError, match="d="):
        shard_bounds(0, 1)
    with pytest.raises(ValueError, match="fewer ranks"):
        shard_bounds(12, 3, Layout.from_shapes([(4, 3)]), kernel=4)   # one pooled group: no cut at all


def test_the_pooled_cases_cut_inside_segments_and_leave_a_rank_nothing_to_pool():
    # the cases above run the max-pooled rules on these bounds: a cut inside a pooled weight, and
    # with 3 ranks a last shard that holds only skipped columns
    assert shard_bounds(W.D, 3, W.LAYOUT) == [(0, 8), (8, 25), (25, 37)]
    assert shard_bounds(W.D, 2, W.FLAT) == [(0, 16), (16, 37)]
    lo, hi = shard_bounds(W.D, 3, W.FLAT)[2]
    assert W.FLAT.columns(W.D, lo, hi, 2).pooled_width(hi - lo, 2) == 0


def test_layout_columns_refuse_a_cut_inside_a_pooling_window():
    with pytest.raises(ValueError, match="inside a window of kernel=2 rows"):
        W.LAYOUT.columns(W.D, 0, 12, 2)   # row 3 of the (5, 4) weight: its window holds rows 2 and 3


class FirstKrum(A.Krum):   # a user's rule: its own steps may read G across coordinates
    pass


class OwnStage(A.PreAggregator):   # a user's pre-aggregator
    def transform(self, rows):
        raise AssertionError("never reached")


@pytest.mark.parametrize("agg, words", [
    (FirstKrum(1), "FirstKrum has no sharded form"),
    (A.Pipeline(OwnStage(), A.FedAvg()), "the pre-aggregator .* has no sharded form"),
    (A.Pipeline(A.NNM(1), FirstKrum(1)), "FirstKrum has no sharded form"),
])
def test_rules_without_a_sharded_form_say_so(agg, words):
    with pytest.raises(ValueError, match=words):
        ShardedAggregator(agg)


def test_every_shipped_aggregator_has_a_sharded_form_and_a_case():
    shipped = {cls for cls in vars(A).values()
               if isinstance(cls, type) and issubclass(cls, A.Aggregator) and cls is not A.Aggregator}
    made = {type(make()) for make in W.rules(torch.zeros(W.D)).values()}
    assert shipped <= set(SHARDED) and shipped <= made
