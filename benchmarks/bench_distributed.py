"""1 rank against W ranks of ShardedAggregator over gloo, on this machine's CPU cores.

    python benchmarks/bench_distributed.py [--world 2] [--n 20] [--model resnet18-cifar] [--json PATH]

Each rank builds the same G (fp32, ResNet-18 size by default) from one seed, keeps its column shard
(``shard_bounds`` with the model's layout) and times every rule of the benchmark's table
(``robustagg.bench.aggregators``), sharded: the median of --repeats calls after one warm-up. The
threads are split evenly between the ranks, so 1 rank and W ranks use the same cores. The bytes
that the collectives carry per call are counted on rank 0: what rank 0 puts into each collective
(its part of an all-reduce or all-gather). On a 2-core machine only the ratios and the bytes mean
anything: the ranks share the memory bandwidth, and gloo runs over loopback.
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from robustagg import aggregators as A
from robustagg.bench.aggregators import make_aggregators
from robustagg.bench.models import EXPECTED_D, model_layout
from robustagg.distributed import ShardedAggregator, shard_bounds

def count_bytes(counter):
    """Wrap the collectives so that rank 0 counts what they carry."""
    for name in ("all_reduce", "all_gather", "all_to_all_single"):
        original = getattr(dist, name)

        def wrapped(*args, _original=original, **kwargs):
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            tensors += [t for a in args if isinstance(a, list) for t in a if isinstance(t, torch.Tensor)]
            counter["bytes"] += tensors[-1].numel() * tensors[-1].element_size() if tensors else 0
            counter["calls"] += 1
            return _original(*args, **kwargs)
        setattr(dist, name, wrapped)


def worker(rank, world, init, args, path):
    torch.set_num_threads(max(1, args.threads // world))
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    d, layout = EXPECTED_D[args.model], model_layout(args.model)
    lo, hi = shard_bounds(d, world, layout)[rank]   # around the max-pooling windows, for every rule
    G = torch.randn(args.n, d, generator=torch.Generator().manual_seed(0)) * 1e-2
    shard = G[:, lo:hi].contiguous()
    root = G[:2].mean(0)
    del G
    counter = {"bytes": 0, "calls": 0}
    count_bytes(counter)
    rows = {}
    # the benchmark's table, made from the whole root update (radii, k); FLTrust takes this rank's slice
    for name, aggregator in make_aggregators(args.n, layout, root, backend=None).items():
        if isinstance(aggregator, A.FLTrust):
            aggregator.root_update = root[lo:hi].clone()
        sharded = ShardedAggregator(aggregator, None)
        sharded(shard)                                   # warm-up
        counter.update(bytes=0, calls=0)
        times = []
        for _ in range(args.repeats):
            dist.barrier()
            start = time.perf_counter()
            sharded(shard)
            dist.barrier()
            times.append(time.perf_counter() - start)
        rows[name] = {"ms": 1e3 * statistics.median(times), "collective_bytes": counter["bytes"] // args.repeats,
                      "collectives": counter["calls"] // args.repeats}
    if rank == 0:
        with open(path, "w") as f:
            json.dump(rows, f)
    dist.destroy_process_group()


def run(world, args):
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "rows.json")
        mp.spawn(worker, args=(world, f"file://{tmp}/init", args, path), nprocs=world, join=True)
        with open(path) as f:
            return json.load(f)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--n", type=int, default=20)
    parser.add_argument("--model", default="resnet18-cifar", choices=sorted(EXPECTED_D))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    one, many = run(1, args), run(args.world, args)
    print(f"{'rule':18} {'1 rank ms':>10} {f'{args.world} ranks ms':>11} {'ratio':>6} {'bytes/call':>11} {'collectives':>11}")
    for name in one:
        a, b = one[name], many[name]
        print(f"{name:18} {a['ms']:10.1f} {b['ms']:11.1f} {b['ms'] / a['ms']:6.2f} {b['collective_bytes']:11,} "
              f"{b['collectives']:11}")
    if args.json:
        meta = {"model": args.model, "d": EXPECTED_D[args.model], "n": args.n, "world": args.world,
                "threads": args.threads, "torch": torch.__version__, "dtype": "float32"}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "one_rank": one, "ranks": many}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
