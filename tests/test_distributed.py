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
from robustagg.distributed import ShardedAggregator, shard_bounds
from robustagg.layout import Layout

BITWISE = {"FedAvg", "CoordinateMedian", "TrimmedMean", "Meamed", "InvariantAggregator", "RobustLR",
           "RobustLR-median"}
WORLDS = [2, 3]


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


def assert_reports_match(sharded, single, exact):
    a, b = dataclasses.asdict(sharded), dataclasses.asdict(single)
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], dict) and not exact:      # client -> score
            assert a[key].keys() == b[key].keys(), key
            torch.testing.assert_close(torch.tensor(list(a[key].values())), torch.tensor(list(b[key].values())),
                                       rtol=1e-9, atol=1e-12)
        elif isinstance(a[key], float) and not exact:
            assert math.isclose(a[key], b[key], rel_tol=1e-9, abs_tol=1e-12), key
        elif isinstance(a[key], list) and a[key] and isinstance(a[key][0], dict) and not exact:
            assert len(a[key]) == len(b[key])
        else:
            assert a[key] == b[key], key


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
            torch.testing.assert_close(out, outs[r], rtol=1e-9, atol=1e-12)
        first = pieces[0][1]
        assert all(report == first for _, report in pieces[1:]), "the reports differ between ranks"
        assert_reports_match(first, reports[r], exact=name in BITWISE)
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


@pytest.mark.parametrize("agg, words", [
    (A.SparseFed(5), "SparseFed has no sharded form"),
    (A.DnC(1), "DnC has no sharded form"),
    (A.MoNNA(1), "MoNNA has no sharded form"),
    (A.CAF(1), "CAF has no sharded form"),
    (A.Pipeline(A.NNM(1), A.FedAvg()), "Pipeline has no sharded form"),
    (A.NormClipping(1.0, noise=0.1), "noise=0.1"),
    (A.RobustLR(2, base="median", clip=1.0), "clip_rows"),
])
def test_rules_without_an_exact_sharded_form_say_so(agg, words):
    with pytest.raises(ValueError, match=words):
        ShardedAggregator(agg)
