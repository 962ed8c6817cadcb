r"""Pre-aggregators and their composition: ``Pipeline(*pre, aggregator)``.

A pre-aggregator maps the rows in play, an (n, d) matrix, to another (n', d) matrix that the next
stage aggregates: nearest-neighbour mixing (``NNM``, Allouah et al., AISTATS 2023), ``Bucketing``
(Karimireddy, He & Jaggi, ICLR 2022) and adaptive robust clipping (``ARC``, Allouah et al. 2024).
``Pipeline(NNM(f=4), TrimmedMean(trim=4))`` is one aggregator: it flattens the updates once,
screens the non-finite clients once (in the first stage's pass over G, under the pipeline's
policy), runs each pre stage on the previous stage's output and then the final rule.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .. import ops
from .._dtypes import dtype_max
from .._policy import POLICIES
from .base import Aggregator, Clients, Report, check_choice, check_int, make_generator, ranking_key


# ---------------------------------------------------------------- what a stage hands on

@dataclass
class Stage:
    """What a pre-aggregator made of the rows in play.

    ``sources[j]`` lists the ids (``rows.all_ids()`` numbering of the stage's input) that output
    row j stands for: ``[i]`` for a rule whose row j is client j's own row (NNM, ARC), a bucket's
    members for Bucketing.
    """
    G: torch.Tensor
    weights: torch.Tensor | None
    sources: list[list[int]]
    report: Report


class PreAggregator:
    """Base class of the pre-aggregators: ``transform(rows) -> Stage``.

    ``transform`` reads G only through the ``Clients`` helpers (``rows.pairwise``, ``rows.stats``,
    ...), which screen the non-finite rows under the policy the rows carry, so that the first stage
    of a pipeline screens the caller's clients in its own pass. Pre-aggregators ignore weights in
    their own arithmetic unless they say otherwise, and hand each output row a weight.

    Called alone, ``pre(G)`` returns the (n', d) matrix of an (n, d) tensor (screened under
    ``nonfinite``, default ``"drop"``) and leaves its report in ``last_report``: the form ByzFL's
    pre-aggregators and ``robustagg.attacks``' ``pre=`` lists use.
    """

    uses_weights = False   # in its own arithmetic; every pre-aggregator hands its rows a weight

    def __init__(self):
        self.last_report: Report | None = None

    @property
    def name(self) -> str:
        return type(self).__name__

    def check_n(self, n: int) -> None:
        """Raise a ValueError if the parameters do not fit n input rows."""

    def output_n(self, n: int) -> int:
        """The number of rows the stage makes of n."""
        return n

    def transform(self, rows: Clients) -> Stage:
        raise NotImplementedError

    def __call__(self, G: torch.Tensor, *, nonfinite: str = "drop", backend: str | None = None) -> torch.Tensor:
        if not isinstance(G, torch.Tensor) or G.dim() != 2:
            raise TypeError(f"{self.name}: expects an (n, d) tensor, got "
                            f"{tuple(G.shape) if isinstance(G, torch.Tensor) else type(G).__name__}")
        rows = Clients(G, None, check_choice(self.name, "nonfinite", nonfinite, POLICIES), backend)
        self.check_n(rows.n)
        stage = self.transform(rows)
        stage.report.rejected_nonfinite = sorted(rows.rejected)
        self.last_report = stage.report
        return stage.G


def own_rows(rows: Clients) -> list[list[int]]:
    """``sources`` of a stage whose output row j is input row j."""
    return [[i] for i in rows.all_ids()]


def rows_in_play(rows: Clients) -> torch.Tensor:
    """The rows in play as one matrix: G itself, or a copy of the kept rows once a row was dropped
    (a dense product with G would give 0 * NaN = NaN in every output row)."""
    return rows.G if rows.selection is None else rows.G.index_select(0, rows.selection)


# ---------------------------------------------------------------- NNM

@dataclass
class NNMReport(Report):
    neighbours: torch.Tensor | None = None   # [n, n - f]: row i, the clients nearest client selected[i], nearest first


class NNM(PreAggregator):
    r"""Nearest-neighbour mixing (Allouah et al., "Fixing by Mixing", AISTATS 2023):

    $$y_i = \frac{1}{n-f} \sum_{j \in N_i} x_j,$$

    $N_i$ the $n - f$ rows nearest $x_i$ in L2 distance, $x_i$ itself included (distance 0); ties
    go to the lower index. Output row i is client i's (weights pass through unchanged).

    One pairwise pass over G (``ops.pairwise_sqdist``, which screens the rows) and one (n x n)
    by (n x d) product with the mixing matrix $M_{ij} = [j \in N_i]/(n-f)$. Each term is scaled by
    $1/(n-f)$ before the sum, and every partial sum is bounded by $\max_j |x_j|$, so huge finite
    rows (3e38 in float32, 1e300 in float64) give finite means; the zero entries of M keep a far
    row out of the rows it is not a neighbour of exactly.

    Requires $0 \le f \le n - 1$ (the paper's guarantees need $n > 2f$). ByzFL's ``NNM(f)`` is the
    same rule; its ``argpartition`` leaves ties open.
    """

    def __init__(self, f: int):
        super().__init__()
        self.f = check_int(self.name, "f", f, 0)

    def check_n(self, n):
        if self.f > n - 1:
            raise ValueError(f"{self.name}: f={self.f} leaves no neighbour for n={n} clients; "
                             f"f must be in [0, {n - 1}] so that n - f >= 1")

    def transform(self, rows: Clients) -> Stage:
        D = rows.pairwise(ops.pairwise_sqdist).double().cpu()   # screens the rows
        self.check_n(rows.n)
        k = rows.n - self.f
        nearest = torch.sort(ranking_key(D), dim=1, stable=True).indices[:, :k]   # stable: ties to the lower index
        X = rows_in_play(rows)
        mixing = torch.zeros(rows.n, rows.n, dtype=X.dtype).scatter_(1, nearest, 1.0 / k).to(X.device)
        ids = rows.all_ids()
        report = NNMReport(selected=ids, neighbours=torch.tensor(ids, dtype=torch.long)[nearest])
        return Stage(mixing @ X, rows.weights, own_rows(rows), report)

    def __repr__(self):
        return f"NNM(f={self.f})"


# ---------------------------------------------------------------- Bucketing

@dataclass
class BucketingReport(Report):
    buckets: list[list[int]] = field(default_factory=list)   # clients of each output row, in draw order


class Bucketing(PreAggregator):
    r"""Bucketing (Karimireddy, He & Jaggi, ICLR 2022, Alg. 1): draw a random permutation $\pi$ of
    the n clients and average consecutive buckets of s:

    $$y_b = \frac{1}{|B_b|} \sum_{k \in B_b} x_{\pi(k)}, \qquad
      B_b = \{(b-1)s + 1, \dots, \min(n, bs)\}, \quad b = 1, \dots, \lceil n/s \rceil.$$

    The last bucket holds $n - s(\lceil n/s \rceil - 1)$ clients and is their mean, as in the
    authors' code and ByzFL (ByzFL's docstring writes $1/s$ for it too; its code divides by the
    bucket's size). $\pi$ comes from ``generator``/``seed`` (``torch.randperm``); ByzFL draws from
    numpy's global RNG.

    Weights: without them (or inside a pipeline whose final rule ignores them) the means are plain,
    as in the paper. With them, a bucket is one virtual client: its row is its members' weighted
    mean and its weight their total, so that ``Pipeline(Bucketing(s), FedAvg())`` is ``FedAvg``.

    One pass over G: the (n/s x n) block-mean matrix times G. A non-finite row makes its bucket's
    row non-finite, so the output is checked instead of G; only then does a ``client_stats`` pass
    find the rows to drop, and the buckets are formed again from the same draw restricted to the
    finite clients (a uniform permutation of them).
    """

    uses_weights = True

    def __init__(self, s: int, *, generator: torch.Generator | None = None, seed: int | None = None):
        super().__init__()
        self.s = check_int(self.name, "s", s, 1)
        self.generator = make_generator(generator, seed)

    def output_n(self, n):
        return math.ceil(n / self.s)

    def transform(self, rows: Clients) -> Stage:
        ids = rows.all_ids()
        order = [ids[i] for i in torch.randperm(rows.n, generator=self.generator,
                                                device=self.generator.device).tolist()]
        G, weights, buckets = self.bucket_means(rows, order)
        if rows.policy != "propagate" and bool(rows.agree(~torch.isfinite(G).all(dim=1)).any()):
            rows.stats()   # finds and drops the non-finite clients (raises under "raise")
            kept = set(rows.all_ids())
            G, weights, buckets = self.bucket_means(rows, [i for i in order if i in kept])
        report = BucketingReport(selected=rows.all_ids(), buckets=buckets)
        return Stage(G, weights, [sorted(b) for b in buckets], report)

    def bucket_means(self, rows: Clients, order: list[int]):
        """The bucket means of the rows in play taken in ``order`` (ids), their weights and members."""
        local = {client: i for i, client in enumerate(rows.all_ids())}
        buckets = [order[start:start + self.s] for start in range(0, len(order), self.s)]
        X = rows_in_play(rows)
        w = rows.weights_or_ones().cpu()
        coef = torch.zeros(len(buckets), rows.n, dtype=torch.float64)
        totals = torch.zeros(len(buckets), dtype=torch.float64)
        for b, members in enumerate(buckets):   # a loop over n/s buckets, on n-sized vectors
            at = torch.tensor([local[i] for i in members])
            totals[b] = w[at].sum()
            # a bucket whose weights are all 0 gets the plain mean (and weight 0)
            coef[b, at] = w[at] / totals[b] if totals[b] > 0 else 1.0 / len(members)
        out = coef.to(dtype=X.dtype, device=X.device) @ X
        weights = None if rows.weights_by_row is None else totals.to(rows.weights_by_row.device)
        return out, weights, buckets

    def __repr__(self):
        return f"Bucketing(s={self.s})"


# ---------------------------------------------------------------- ARC

@dataclass
class ARCReport(Report):
    k: int = 0                          # floor(2 f (n - f) / n): how many of the largest norms are clipped
    threshold: float = math.inf         # the (k+1)-th largest norm
    clipped: list[int] = field(default_factory=list)   # clients scaled down (norm > threshold)


class ARC(PreAggregator):
    r"""Adaptive robust clipping (Allouah, Guerraoui, Gupta, Jellouli, Rizk & Stephan, 2024, "The
    Vital Role of Gradient Clipping in Byzantine-Resilient Distributed Learning", Alg. 1):
    with $k = \lfloor 2 \frac{f}{n} (n - f) \rfloor$ and $C$ the $(k+1)$-th largest norm,

    $$y_i = \min\left(1, \frac{C}{\|x_i\|}\right) x_i .$$

    Clipping every row to $C$ is clipping the k largest: the others have norms $\le C$. So ties in
    the norms cannot change the output (a row of norm exactly C is kept as it is). k is computed
    exactly, in integers. ByzFL computes ``int((2 * f / n) * (n - f))`` in floating point, which
    rounds an exact integer down at 31 of the (n, f) pairs with n <= 1000 (e.g. n = 121, f = 66:
    k = 60 here, 59 there; tests/test_peers.py). Output row i is client i's; weights pass through.

    One ``client_stats`` pass (norms, screening the rows), then one ``clip_rows`` pass when k > 0.
    Requires $0 \le f \le n$ (as ByzFL; $k \le n/2$, so the $(k+1)$-th norm exists; the paper
    assumes $n > 2f$).
    """

    def __init__(self, f: int):
        super().__init__()
        self.f = check_int(self.name, "f", f, 0)

    def check_n(self, n):
        if self.f > n:
            raise ValueError(f"{self.name}: f={self.f} exceeds n={n} clients; f must be in [0, {n}]")

    def transform(self, rows: Clients) -> Stage:
        norm = rows.stats().norm.double().cpu()   # screens the rows
        self.check_n(rows.n)
        n, ids = rows.n, rows.all_ids()
        k = 2 * self.f * (n - self.f) // n
        if k == 0:
            report = ARCReport(selected=ids, k=0, threshold=float(norm.max()))
            return Stage(rows_in_play(rows), rows.weights, own_rows(rows), report)
        threshold = float(norm.sort(descending=True).values[k])
        # The non-finite rows were screened above; clip_rows reads them, and they are left out after.
        # A float32 row of entries near 3e38 can have a norm beyond float32's range, which clip_rows'
        # bound (in G's arithmetic dtype) cannot hold: there the bound is that dtype's largest value.
        bound = min(threshold, dtype_max(rows.G.dtype))
        clipped = rows.clip_rows(bound)
        if rows.selection is not None:
            clipped = clipped.index_select(0, rows.selection)
        report = ARCReport(selected=ids, k=k, threshold=threshold, clipped=rows.ids(norm > threshold))
        return Stage(clipped, rows.weights, own_rows(rows), report)

    def __repr__(self):
        return f"ARC(f={self.f})"


# ---------------------------------------------------------------- Pipeline

@dataclass
class PipelineReport(Report):
    stages: list[Report] = field(default_factory=list)     # each pre stage's report, in its input's numbering
    final: Report | None = None                            # the final rule's report, numbering its n' rows
    sources: list[list[int]] = field(default_factory=list)  # the caller's clients behind each of those rows


class Pipeline(Aggregator):
    r"""``Pipeline(*pre, aggregator)``: the pre-aggregators in order, then the aggregator's rule, on
    one flattening of the updates, e.g. ``Pipeline(NNM(f=4), TrimmedMean(trim=4))``.

    * **Non-finite clients** are screened once, under the pipeline's ``nonfinite`` policy, in the
      first stage's pass over G; the later stages and the final rule see finite rows only and run
      unchecked. ``last_report.rejected_nonfinite`` lists the caller's clients.
    * **n**: each stage, and the final rule, checks its parameters against the rows it receives
      (``Bucketing(s)`` hands on ceil(n/s)); an error names the stages before it.
    * **Report** (``PipelineReport``): ``stages`` (each pre stage's report), ``final`` (the final
      rule's, whose client numbers are its input rows 0..n'-1), ``sources`` (the caller's clients
      behind each of those rows), and ``selected``: the union of the sources of the rows the
      final rule selected (for NNM and ARC, row i is client i; a bucket stands for its members),
      or None when the final rule does not select.
    * **Weights** are used as the final rule uses them (``uses_weights`` is its). They pass
      through NNM and ARC with their rows; a bucket's weight is its members' total. A pipeline
      whose final rule ignores weights hands no weights to its stages.
    * **Buffers** follow the pipeline's ``buffers`` (by default the final aggregator's setting):
      held-out floating buffers are combined over ``selected`` (every finite client when the
      final rule does not select); under ``"rule"`` they go through every stage with the rest.
    * ``nonfinite``, ``backend``, ``buffers`` and ``buffer_keys`` default to the final aggregator's;
      the pipeline's values are the ones used (the final aggregator's own policy is not applied
      again).
    * ``state_dict()`` / ``load_state_dict()`` are the final aggregator's, for a stateful one.
    """

    def __init__(self, *stages, nonfinite: str | None = None, backend: str | None = None,
                 buffers: str | None = None, buffer_keys=None):
        if not stages:
            raise TypeError("Pipeline needs at least a final aggregator: Pipeline(*pre_aggregators, aggregator)")
        *pre, final = stages
        if not isinstance(final, Aggregator):
            kind = "a pre-aggregator" if isinstance(final, PreAggregator) else type(final).__name__
            raise TypeError(f"Pipeline: the last stage must be an Aggregator (the rule that reduces the rows to "
                            f"one vector), got {final!r} ({kind})")
        for position, stage in enumerate(pre):
            if not isinstance(stage, PreAggregator):
                hint = ("; an aggregator returns one vector, so it can only come last"
                        if isinstance(stage, Aggregator) else "")
                raise TypeError(f"Pipeline: stage {position} must be a pre-aggregator (NNM, Bucketing, ARC or a "
                                f"PreAggregator subclass), got {stage!r}{hint}")
        super().__init__(nonfinite=final.nonfinite if nonfinite is None else nonfinite,
                         backend=final.backend if backend is None else backend,
                         buffers=final.buffers if buffers is None else buffers,
                         buffer_keys=final.buffer_keys if buffer_keys is None else buffer_keys)
        self.pre, self.final = tuple(pre), final

    @property
    def uses_weights(self) -> bool:
        return self.final.uses_weights

    def check_final_n(self, n: int, stages) -> None:
        """The final rule's check on the n' rows it receives, naming the stages that made them."""
        try:
            self.final.check_n(n)
        except ValueError as error:
            if not stages:
                raise
            chain = " -> ".join(map(repr, stages))
            verb = "hands" if len(stages) == 1 else "hand"
            raise ValueError(f"{self.name}: {chain} {verb} n'={n} rows to {self.final.name}: {error}") from error

    def check_n(self, n):
        for stage in self.pre:
            stage.check_n(n)
            n = stage.output_n(n)
        self.check_final_n(n, self.pre)

    def aggregate(self, rows: Clients, layout):
        current, sources, reports = rows, None, []
        if not self.uses_weights:
            current.weights_by_row = None
        for stage in self.pre:
            out = stage.transform(current)
            out.report.rejected_nonfinite = sorted(current.rejected)
            reports.append(out.report)
            stage.last_report = out.report
            # each output row stands for the caller's clients behind the input rows it came from
            sources = out.sources if sources is None else [sorted({c for i in row for c in sources[i]})
                                                           for row in out.sources]
            current = current.derived(out.G, out.weights)
        if sources is None:
            sources = own_rows(rows)
        self.check_final_n(current.n, self.pre)
        result, final = self.final.aggregate(current, layout)
        self.final.last_report = final
        selected = None if final.selected is None else sorted({c for j in final.selected for c in sources[j]})
        return result, PipelineReport(selected=selected, stages=reports, final=final, sources=sources)

    def state_dict(self) -> dict:
        return self.final.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.final.load_state_dict(state)

    def __repr__(self):
        return f"Pipeline({', '.join(map(repr, (*self.pre, self.final)))})"
