"""What each rank runs in tests/test_distributed.py: every case on its column shard, over gloo.

A module of its own, so that ``torch.multiprocessing.spawn`` finds the function in the children
by name. Every rank builds the same full inputs from the same seeds and keeps its shard.
"""
import torch
import torch.distributed as dist

from robustagg import attacks
from robustagg import aggregators as A
from robustagg.distributed import ShardedAggregator, scatter_updates, shard_bounds
from robustagg.layout import Layout

N, D = 12, 37   # Bulyan(f=2) needs n >= 11 after a NaN client is dropped; 37 columns split unevenly
ROUNDS = 2              # stateful rules run twice, so the second round starts from sharded state


def inputs(kind: str, dtype=None) -> torch.Tensor:
    """The full (N, D) matrix of one named kind, the same on every rank: float64, but for the
    float32 kinds (where SparseFed's top-k reads 32-bit keys)."""
    dtype = dtype or (torch.float32 if kind.endswith("float32") else torch.float64)
    g = torch.Generator().manual_seed(7)
    G = torch.randn(N, D, generator=g, dtype=torch.float64) + 0.5
    if kind == "lie":
        G[-3:] = attacks.lie(G[:-3], 3)
    elif kind == "nan_in_last_shard":
        G[4, D - 1] = float("nan")   # one entry, on the last rank only: every rank must drop client 4
    elif kind == "huge":
        G[2] = 1e300                 # finite: norms and cosines stay finite, and client 2 is outvoted
    elif kind == "huge_float32":
        G[2] = 3e38                  # float32's largest values: its squares and sums overflow float32
    elif kind == "ties":
        G = torch.randint(-1, 2, (N, D), generator=g).double()
        G[1] = G[0]
    elif kind == "equal_magnitudes":
        # G_ij = c_i s_j: every coordinate of the mean has the same |value|, so SparseFed's top-k is
        # all ties, spread over every rank; the rows are parallel (every cosine is 1)
        signs = torch.randint(0, 2, (D,), generator=g).double() * 2 - 1
        G = (1 + torch.arange(N, dtype=torch.float64) / N)[:, None] * signs[None, :]
    return G.to(dtype)


def rules(root: torch.Tensor):
    """name -> a fresh aggregator; ``root`` is FLTrust's server update (this rank's slice of it)."""
    return {
        "FedAvg": lambda: A.FedAvg(),
        "CoordinateMedian": lambda: A.CoordinateMedian(),
        "TrimmedMean": lambda: A.TrimmedMean(trim=2),
        "Meamed": lambda: A.Meamed(2),
        "InvariantAggregator": lambda: A.InvariantAggregator(0.2),
        "RobustLR": lambda: A.RobustLR(4),
        "RobustLR-sign": lambda: A.RobustLR(4, base="sign", clip=3.0),
        "RobustLR-median": lambda: A.RobustLR(4, base="median"),
        "SignSGD": lambda: A.SignSGD(),
        "NormClipping": lambda: A.NormClipping(3.0),
        "GeometricMedian": lambda: A.GeometricMedian(),
        "CenteredClipping": lambda: A.CenteredClipping(2.0, iters=2),
        "Krum": lambda: A.Krum(2),
        "MultiKrum": lambda: A.MultiKrum(2, m=4),
        "MultiKrumCos": lambda: A.MultiKrumCos(2),
        "Bulyan": lambda: A.Bulyan(2),
        "MDA": lambda: A.MDA(2),
        "SignGuard": lambda: A.SignGuard(seed=3),
        "SignGuard-dist": lambda: A.SignGuard(variant="dist", seed=3),
        "SignGuard-sim": lambda: A.SignGuard(variant="sim", seed=3),
        "FLTrust": lambda: A.FLTrust(root),
        "NormClipping-noise": lambda: A.NormClipping(3.0, noise=0.1, seed=1),
        "RobustLR-noise": lambda: A.RobustLR(4, clip=3.0, noise=0.1, seed=2),
        "RobustLR-median-clip": lambda: A.RobustLR(4, base="median", clip=3.0),
        "MoNNA": lambda: A.MoNNA(2, idx=1),
        "CAF": lambda: A.CAF(2),
        "SMEA": lambda: A.SMEA(1),
        "DnC": lambda: A.DnC(2, niters=2, subsample_dim=10, seed=5),
        "SparseFed": lambda: A.SparseFed(5),
        "SparseFed-k20": lambda: A.SparseFed(20),   # takes more than a shard's coordinates
        "SparseFed-momentum-clip": lambda: A.SparseFed(5, rho=0.9, clip=3.0),
        "CosDen": lambda: A.CosDen(4, 0.25, layout=LAYOUT),
        "EuDen": lambda: A.EuDen(4, 0.25, layout=FLAT),
        "MgDen-official": lambda: A.MgDen(4, 0.25, score="official", layout=LAYOUT),
        "FLTrustAmp": lambda: A.FLTrustAmp(root, layout=LAYOUT),
        "NNM-TrimmedMean": lambda: A.Pipeline(A.NNM(2), A.TrimmedMean(trim=2)),
        "Bucketing-Median": lambda: A.Pipeline(A.Bucketing(2, seed=4), A.CoordinateMedian()),
        "ARC-Krum": lambda: A.Pipeline(A.ARC(2), A.Krum(2)),
    }


# The max-pooled rules' layouts over D = 37, both with parts smaller than a shard. LAYOUT: a (5, 4)
# weight whose last row pools to nothing, a bias, a (4, 3) weight. FLAT: the authors' rows of 4,
# 13 columns skipped, so the last of 3 ranks pools to nothing at all.
LAYOUT = Layout.from_shapes([(5, 4), (5,), (4, 3)])
FLAT = Layout.flat(4, skip_tail=13)
POOLED = {"CosDen": LAYOUT, "EuDen": FLAT, "MgDen-official": LAYOUT, "FLTrustAmp": LAYOUT}


def bounds(name: str, world: int) -> list[tuple[int, int]]:
    """The rule's column shards: around its pooling windows for the max-pooled rules."""
    return shard_bounds(D, world, POOLED.get(name))


KINDS = ["random", "lie", "nan_in_last_shard", "huge", "ties", "equal_magnitudes", "float32", "huge_float32"]
WEIGHTS = torch.arange(1, N + 1, dtype=torch.float64)


def run_all(group=None):
    """{(rule, kind, round): (this rank's output slice, the report)} for every case."""
    world, rank = dist.get_world_size(), dist.get_rank()
    out = {}
    for kind in KINDS:
        G = inputs(kind)
        root = G[:3].mean(0)
        for name in rules(root):
            lo, hi = bounds(name, world)[rank]
            sharded = ShardedAggregator(rules(root[lo:hi])[name](), group)
            weights = WEIGHTS if sharded.aggregator.uses_weights else None
            for r in range(ROUNDS):
                value = sharded(G[:, lo:hi], weights)
                out[(name, kind, r)] = (value, sharded.last_report)
    return out


def worker(rank: int, world: int, init: str, path: str):
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        results = {"cases": run_all()}
        # scatter_updates: rank r starts with clients r, r + world, ... (an uneven split)
        G = inputs("random", torch.float32)
        mine = G[rank::world]
        bounds = shard_bounds(D, world)
        results["scatter"] = scatter_updates(mine, bounds)
        results["scatter_order"] = [i for r in range(world) for i in range(r, N, world)]
        layout = Layout.from_shapes([(4, 3), (5,), (6, 2)])
        results["bounds_with_layout"] = shard_bounds(layout.d, world, layout)
        gathered = [None] * world
        dist.all_gather_object(gathered, results)
        if rank == 0:
            torch.save(gathered, path)
    finally:
        dist.destroy_process_group()
