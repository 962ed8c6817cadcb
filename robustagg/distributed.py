"""Coordinate-sharded aggregation over ``torch.distributed`` (docs/distributed.md).

Rank r of W holds every client's values of the columns ``shard_bounds(d, W)[r]``: an (n, hi - lo)
block of the client matrix G. ``ShardedAggregator(agg)(G_shard)`` returns that rank's slice of
``agg(G)``, for every aggregator of ``robustagg.aggregators``:

* coordinate-wise passes (medians, trimmed means, sign votes, weighted means, top-k updates) run on
  the block as they would on G, so their columns are bitwise the single-process ones;
* what a rule reads across coordinates (row norms, dot products, distances, cosines, Gram
  matrices, sign-window fractions, non-finite flags, DnC's sampled columns) is summed over the
  ranks from n, n x n or n x b float64 numbers; no d-sized vector crosses ranks. Norms are
  combined scaled, so a finite row of 1e300 keeps a finite norm;
* SparseFed's global top-k is a radix select over the ranks: histograms of the keys' digits are
  all-reduced, the keys themselves stay put.

Every rank makes the same decisions (dropped clients, selections), because each decision is made
from the same combined numbers; reports are the same on every rank.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from . import aggregators as A
from . import ops
from ._checks import check_int, check_weights
from ._dtypes import dtype_max
from .aggregators.base import Clients
from .layout import Layout

__all__ = ["shard_bounds", "scatter_updates", "ShardedAggregator"]

RADIX_BITS = 8   # bits of |e| per pass of the distributed top-k: 4 passes in float32, 8 in float64


# ---------------------------------------------------------------- the split

def shard_bounds(d: int, world_size: int, layout: Layout | None = None, kernel: int = 2) -> list[tuple[int, int]]:
    """Contiguous column ranges ``(lo, hi)``, one per rank in rank order, covering ``0..d``.

    Without a layout the ranges are as even as integers allow. With one, each boundary moves to the
    nearest point that keeps every max-pooling window of ``kernel`` rows on one rank: a boundary
    falls between parameters, anywhere inside an unpooled one, or between groups of ``kernel`` rows
    of a pooled parameter's 2-D view (ties to the lower point). Every range holds at least one
    column.
    """
    d = check_int("shard_bounds", "d", d, 1)
    world_size = check_int("shard_bounds", "world_size", world_size, 1, d, f" (at most d={d}, one column per rank)")
    kernel = check_int("shard_bounds", "kernel", kernel, 1)
    cuts = [round(r * d / world_size) for r in range(world_size + 1)]
    if layout is not None:
        allowed = _pooling_cut(layout.segments_for(d), kernel)
        cuts = [0] + [allowed(c) for c in cuts[1:-1]] + [d]
    if any(lo >= hi for lo, hi in zip(cuts, cuts[1:])):
        raise ValueError(f"shard_bounds: the layout's pooled parameters leave no cut for world_size={world_size} "
                         f"ranks of at least one column each over d={d} (cuts {cuts}); use fewer ranks")
    return list(zip(cuts, cuts[1:]))


def _pooling_cut(segments, kernel: int):
    """The nearest cut to c that no pooling window straddles."""
    pooled = [(s.offset, s.offset + s.numel, kernel * s.cols) for s in segments if s.pooled and s.numel]

    def nearest(c: int) -> int:
        for start, end, step in pooled:
            if start < c < end:
                below = start + (c - start) // step * step
                above = min(below + step, end)
                return below if c - below <= above - c else above
        return c
    return nearest


def scatter_updates(updates: torch.Tensor, bounds: list[tuple[int, int]], group=None) -> torch.Tensor:
    """Whole-client updates on each rank to column shards, with one ``all_to_all``.

    ``updates`` is this rank's (m_r, d) block of whole client updates (m_r may differ by rank, and
    may be 0). Returns this rank's (n, hi - lo) shard, n = sum of m_r, the clients in rank order and
    in their order within each rank: client numbers are global in that order.
    """
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    if not isinstance(updates, torch.Tensor) or updates.dim() != 2:
        raise TypeError(f"scatter_updates: updates must be an (m, d) tensor, got "
                        f"{tuple(updates.shape) if isinstance(updates, torch.Tensor) else type(updates).__name__}")
    _check_bounds(bounds, updates.shape[1], world)
    counts = torch.tensor([updates.shape[0]], dtype=torch.int64, device=updates.device)
    every = [torch.zeros_like(counts) for _ in range(world)]
    dist.all_gather(every, counts, group=group)
    counts = [int(c) for c in every]
    lo, hi = bounds[rank]
    # one flat buffer each way: all_to_all_single allows blocks of different sizes on every backend
    sent = torch.cat([updates[:, a:b].reshape(-1) for a, b in bounds])
    received = updates.new_empty(sum(counts) * (hi - lo))
    dist.all_to_all_single(received, sent, output_split_sizes=[m * (hi - lo) for m in counts],
                           input_split_sizes=[updates.shape[0] * (b - a) for a, b in bounds], group=group)
    return received.reshape(sum(counts), hi - lo)


def _check_bounds(bounds, d: int, world: int) -> None:
    cuts = [0] + [hi for _, hi in bounds]
    if (len(bounds) != world or any(lo != cuts[i] for i, (lo, _) in enumerate(bounds)) or cuts[-1] != d
            or any(lo >= hi for lo, hi in bounds)):
        raise ValueError(f"bounds={bounds!r} must be {world} contiguous, non-empty (lo, hi) column ranges covering "
                         f"0..{d} in rank order, as shard_bounds(d, world_size) gives")


# ---------------------------------------------------------------- the rows of a sharded G

class ShardedClients(Clients):
    """The rows in play when G is split by columns over a process group: each cross-coordinate
    quantity is the all-reduced sum of the shards' parts."""

    sharded = True

    def __init__(self, G, weights, policy, backend, group, d: int, lo: int):
        super().__init__(G, weights, policy, backend)
        self.group = group
        self.d_total = d
        self.lo = lo
        self._shard_norms = None   # each row's norm over this shard, once a pass has read them

    @property
    def d(self) -> int:
        return self.d_total

    def _reduce(self, t: torch.Tensor, op) -> torch.Tensor:
        t = t.clone()
        dist.all_reduce(t, op=op, group=self.group)
        return t

    def agree(self, bad: torch.Tensor) -> torch.Tensor:
        return self._reduce(bad.to(torch.uint8), dist.ReduceOp.MAX).bool()

    def _norm(self, part: torch.Tensor) -> torch.Tensor:
        """sqrt(sum_r part_r^2), scaled by the largest part so that no square overflows."""
        part = part.double()
        top = self._reduce(part, dist.ReduceOp.MAX)
        safe = torch.where(top > 0, top, torch.ones_like(top))
        return top * self._reduce((part / safe) ** 2, dist.ReduceOp.SUM).sqrt()

    def client_stats(self, window=None, ref=None) -> ops.ClientStats:
        width = self.G.shape[1]
        start, length = (0, self.d_total) if window is None else window
        lo, hi = max(start - self.lo, 0), min(start + length - self.lo, width)
        inside = max(hi - lo, 0)
        s = ops.client_stats(self.G, (lo, inside) if inside else (0, 1), ref, nonfinite="propagate",
                             backend=self.backend)
        if inside == width:
            self._shard_norms = s.norm.double()
        norm = self._norm(s.norm)
        counts = self._reduce((s.sign_frac.double() * inside).round(), dist.ReduceOp.SUM)
        dot = ref_norm = ref_dist = cosine = None
        if ref is not None:
            dot = self._reduce(s.dot.double(), dist.ReduceOp.SUM)
            ref_norm = self._norm(s.ref_norm.reshape(1))[0]
            ref_dist = self._norm(s.ref_dist)
            # cos = sum_r cos_r * (|g_i|_r / |g_i|) * (|ref|_r / |ref|): every factor in [-1, 1],
            # so a 1e300 row cannot overflow it, where dot / (norm * ref_norm) would
            share = torch.where(norm > 0, s.norm.double() / norm, torch.zeros_like(norm))
            ref_share = s.ref_norm.double() / ref_norm if float(ref_norm) > 0 else torch.zeros_like(ref_norm)
            cosine = self._reduce(s.cosine.double() * share * ref_share, dist.ReduceOp.SUM).clamp(-1.0, 1.0)
        finite = ~self.agree(~s.finite)
        return ops.ClientStats(norm, counts / length, dot, ref_norm, ref_dist, cosine, finite)

    def shard_norms(self) -> torch.Tensor:
        """Each row's norm over this shard's columns, float64: from the last pass that read every
        column, else from one ``client_stats`` pass."""
        if self._shard_norms is None:
            self._shard_norms = ops.client_stats(self.G, nonfinite="propagate", backend=self.backend).norm.double()
        return self._shard_norms

    def _sum_matrices(self, M: torch.Tensor) -> torch.Tensor:
        """The sum of every rank's n x n matrix, added in rank order on every rank (an all-gather of
        world x n^2 numbers, where an all-reduce moves about 2 n^2). An all-reduce adds each chunk in
        its own rank order; here every entry is added in one order, so a sum of symmetric matrices
        stays exactly symmetric (MDA's conflict graph needs (i, j) and (j, i) equal), and entries
        equal in every part stay equal in the sum (identical rows keep a cosine of exactly 1)."""
        parts = [torch.empty_like(M) for _ in range(dist.get_world_size(self.group))]
        dist.all_gather(parts, M.contiguous(), group=self.group)
        total = parts[0].clone()
        for part in parts[1:]:
            total += part
        return total

    def pairwise_with_flags(self, op) -> tuple[torch.Tensor, torch.Tensor]:
        M, bad = op(self.G, nonfinite="propagate", return_nonfinite=True, backend=self.backend)
        bad = self.agree(bad)
        if op is ops.pairwise_sqdist:
            return self._sum_matrices(M.double()).to(M.dtype), bad
        if op is ops.pairwise_cosine:
            # the cosines of the shards, each weighted by its share of both rows' norms ...
            part = self.shard_norms()
            norm = self._norm(part)
            share = torch.where(norm > 0, part / norm, torch.zeros_like(norm))
            C = self._sum_matrices(M.double() * share[:, None] * share[None, :])
            # ... over sqrt(C_ii C_jj), which is 1 but for the rounding of the shares: identical rows
            # then have C_ij = C_ii = C_jj and a cosine of exactly 1, as in one process
            diag = C.diagonal().clone()
            scale = (diag[:, None] * diag[None, :]).sqrt()
            C = torch.where(scale > 0, C / torch.where(scale > 0, scale, torch.ones_like(scale)), torch.zeros_like(C))
            C.diagonal().copy_((norm > 0).double())   # unit diagonal, 0 for a zero row, as in one process
            return C.clamp(-1.0, 1.0).to(M.dtype), bad
        raise NotImplementedError(f"ShardedClients: no sharded form of {op!r}")

    def distance(self, a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
        stats = ops.client_stats(a[None, :], ref=b, nonfinite="propagate", backend=self.backend)
        return float(self._norm(stats.ref_dist)[0]), float(self._norm(stats.ref_norm.reshape(1))[0])

    def fraction(self, mask: torch.Tensor) -> float:
        count = torch.tensor([int(mask.sum())], dtype=torch.int64, device=mask.device)
        return int(self._reduce(count, dist.ReduceOp.SUM)) / self.d_total

    def derived(self, G, weights):
        return ShardedClients(G, weights, "propagate", self.backend, self.group, self.d_total, self.lo)

    def norm(self, v: torch.Tensor) -> float:
        part = ops.client_stats(v[None, :], nonfinite="propagate", backend=self.backend).norm
        return float(self._norm(part)[0])

    def gram_total(self, K: torch.Tensor) -> torch.Tensor:
        return self._sum_matrices(K)

    def sampled_columns(self, cols: torch.Tensor) -> torch.Tensor:
        # Each column is one rank's; the others add -0.0, which leaves every value, +-0 included, as is.
        width, device = self.G.shape[1], self.G.device
        mine = (cols >= self.lo) & (cols < self.lo + width)
        X = torch.full((self.n_total, cols.numel()), -0.0, dtype=torch.float64, device=device)
        X[:, mine.to(device)] = self.G.index_select(1, (cols[mine] - self.lo).to(device)).double()
        return self._reduce(X, dist.ReduceOp.SUM).cpu()

    def clip_rows(self, bound: float) -> torch.Tensor:
        # min(1, bound / ||g_i||) on every shard: a clipped row's shard r is bounded by its own share,
        # bound * ||g_i||_r / ||g_i||; an unclipped row's shards by the dtype's largest value (no-op)
        part = self.shard_norms()
        norm = self._norm(part)
        clipped = torch.isfinite(norm) & (norm > bound)
        share = torch.where(clipped, bound * part / torch.where(clipped, norm, torch.ones_like(norm)),
                            torch.full_like(norm, dtype_max(self.G.dtype)))
        return ops.clip_rows(self.G, share, nonfinite="propagate", backend=self.backend)

    def topk_ef_step(self, u, error, momentum, k: int, rho: float):
        ops.topk_ef_step(u, error, momentum, 0, rho, backend=self.backend)   # the update alone, bitwise
        k = min(k, self.d_total)
        if k == 0:
            return torch.zeros(0, dtype=torch.int64, device=u.device), error[:0].clone()
        # The global top k holds at most k of this shard's coordinates, its largest (ties to the
        # lower index, as the global rule): the shard's own top k (one fused pass) are the only
        # candidates, and the radix select reads those alone.
        local, values = ops.topk_abs(error, min(k, error.numel()), backend=self.backend)
        # |e| of a finite float is ordered as its bits are, read as a non-negative integer
        keys = values.abs().view(torch.int32 if error.element_size() == 4 else torch.int64)
        threshold, above = self._kth_largest(keys, k)
        # Ties go to the lowest model coordinates: the ranks before this one take theirs first. A
        # shard whose candidates end inside the ties holds at least as many as are needed, so
        # counting its candidate ties, not all of them, gives every rank the same share.
        ties = (keys == threshold).nonzero().flatten()
        count = torch.tensor([ties.numel()], dtype=torch.int64, device=u.device)
        every = [torch.zeros_like(count) for _ in range(dist.get_world_size(self.group))]
        dist.all_gather(every, count, group=self.group)
        before = sum(int(c) for c in every[:dist.get_rank(self.group)])
        take = min(max(k - above - before, 0), ties.numel())
        chosen = torch.cat([(keys > threshold).nonzero().flatten(), ties[:take]]).sort().values
        idx = local[chosen]
        values = error[idx].clone()
        error[idx] = 0
        momentum[idx] = 0
        return idx, values

    def _kth_largest(self, keys: torch.Tensor, k: int) -> tuple[int, int]:
        """The k-th largest key of all shards (1 <= k <= d) and the count of keys above it: a radix
        select from the top digit, RADIX_BITS bits a pass, each pass one all-reduce of a histogram
        of 2^RADIX_BITS counts over the keys that still match; no key crosses ranks."""
        bins = 1 << RADIX_BITS
        threshold, above, remaining, candidates = 0, 0, k, keys
        for shift in range(keys.element_size() * 8 - RADIX_BITS, -1, -RADIX_BITS):
            digits = ((candidates >> shift) & (bins - 1)).long()
            hist = self._reduce(torch.bincount(digits, minlength=bins), dist.ReduceOp.SUM)
            from_top = hist.flip(0).cumsum(0)
            pos = int(torch.searchsorted(from_top, remaining))   # first digit from the top reaching the k-th
            digit = bins - 1 - pos
            passed = int(from_top[pos] - hist[digit])
            threshold, above, remaining = threshold | digit << shift, above + passed, remaining - passed
            candidates = candidates[digits == digit]
        return threshold, above

    def maxpool(self, layout, kernel: int, root=None):
        kernel = ops.check_pool_kernel("maxpool_amplify", layout, self.d_total, kernel)
        width = self.G.shape[1]
        mine = layout.columns(self.d_total, self.lo, self.lo + width, kernel)
        total = layout.pooled_width(self.d_total, kernel)
        lo = layout.columns(self.d_total, 0, self.lo, kernel).pooled_width(self.lo, kernel) if self.lo else 0
        if mine.pooled_width(width, kernel) == 0:
            # a shard that pools to nothing holds one zero column, which adds nothing to any sum
            P = self.G.new_zeros(self.n_total, 1)
            return ShardedClients(P, None, "propagate", self.backend, self.group, total, lo), \
                (None if root is None else root.new_zeros(1))
        P = ops.maxpool_amplify(self.G, mine, kernel, nonfinite="propagate", backend=self.backend)
        pooled_root = None if root is None else ops.maxpool_amplify(root[None, :], mine, kernel,
                                                                   backend=self.backend)[0]
        return ShardedClients(P, None, "propagate", self.backend, self.group, total, lo), pooled_root


# ---------------------------------------------------------------- the aggregator

# The rules whose every cross-coordinate step goes through the Clients methods above. A subclass
# may add steps of its own, so the check is on the exact type.
SHARDED = (A.FedAvg, A.CoordinateMedian, A.TrimmedMean, A.Meamed, A.SignSGD, A.NormClipping, A.GeometricMedian,
           A.CenteredClipping, A.Krum, A.MultiKrum, A.MultiKrumCos, A.Bulyan, A.MDA, A.MoNNA, A.CAF, A.SMEA, A.DnC,
           A.InvariantAggregator, A.RobustLR, A.SparseFed, A.SignGuard, A.CosDen, A.EuDen, A.MgDen, A.FLTrust,
           A.FLTrustAmp, A.Pipeline)
SHARDED_PRE = (A.NNM, A.Bucketing, A.ARC)


def _not_sharded(agg) -> str | None:
    """Why ``agg`` cannot run sharded, or None."""
    if type(agg) not in SHARDED:
        return (f"{agg.name} has no sharded form; the rules that have one are "
                f"{', '.join(cls.__name__ for cls in SHARDED)}")
    if isinstance(agg, A.Pipeline):
        for stage in agg.pre:
            if type(stage) not in SHARDED_PRE:
                return (f"{agg!r}: the pre-aggregator {stage!r} has no sharded form; the ones that have one are "
                        f"{', '.join(cls.__name__ for cls in SHARDED_PRE)}")
        return _not_sharded(agg.final)
    return None


class ShardedAggregator:
    """``aggregator`` over a column shard of G on every rank of ``group``.

    ``sharded(G_shard, weights=None)``, called on every rank, takes the (n, hi - lo) block of all n
    clients' updates for that rank's ``shard_bounds`` range (the same n on every rank, ranges in
    rank order) and returns that rank's slice of ``aggregator(G)``. ``last_report`` is the same on
    every rank. Stateful rules keep their state sharded: each rank's aggregator holds the state of
    its own columns. Randomness (SignGuard's window, DnC's columns, Bucketing's permutation,
    noise) is drawn the same on every rank when each rank builds its aggregator with the same seed.
    FLTrust's ``root_update`` is this rank's slice of the server's update; the max-pooled rules
    take the whole model's ``layout`` and bounds from ``shard_bounds(d, world_size, layout)``.

    Raises ValueError for an aggregator without a sharded form: a type other than the shipped rules
    (a subclass may read G in steps of its own), or a pipeline with another pre-aggregator.
    """

    def __init__(self, aggregator: A.Aggregator, group=None):
        if not isinstance(aggregator, A.Aggregator):
            raise TypeError(f"ShardedAggregator: aggregator must be a robustagg Aggregator, got "
                            f"{type(aggregator).__name__}")
        why = _not_sharded(aggregator)
        if why is not None:
            raise ValueError(f"ShardedAggregator: {why}")
        self.aggregator = aggregator
        self.group = group
        self.last_report = None

    def __call__(self, G_shard: torch.Tensor, weights=None) -> torch.Tensor:
        name = f"ShardedAggregator({self.aggregator.name})"
        if not isinstance(G_shard, torch.Tensor) or G_shard.dim() != 2 or not G_shard.is_floating_point():
            got = (f"shape {tuple(G_shard.shape)}, dtype {G_shard.dtype}" if isinstance(G_shard, torch.Tensor)
                   else type(G_shard).__name__)
            raise TypeError(f"{name}: G_shard must be a floating (n, width) tensor, got {got}")
        n, width = G_shard.shape
        sizes = torch.tensor([n, width], dtype=torch.int64, device=G_shard.device)
        every = [torch.zeros_like(sizes) for _ in range(dist.get_world_size(self.group))]
        dist.all_gather(every, sizes, group=self.group)
        counts, widths = [int(e[0]) for e in every], [int(e[1]) for e in every]
        if len(set(counts)) != 1 or min(widths) < 1:
            raise ValueError(f"{name}: every rank must hold all n clients and at least one column; the ranks "
                             f"hold n={counts} clients and {widths} columns")
        rank = dist.get_rank(self.group)
        w = None if weights is None else check_weights(name, weights, n, G_shard.device)
        rows = ShardedClients(G_shard.contiguous(), w, self.aggregator.nonfinite, self.aggregator.backend,
                              self.group, d=sum(widths), lo=sum(widths[:rank]))
        out, report = self.aggregator.run_rule(rows, Layout.from_shapes([(rows.d,)]))
        self.last_report = report
        return out
