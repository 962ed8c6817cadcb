"""What every aggregator shares: structure in and out, the non-finite policy, weights, reports.

An aggregator is called as ``agg(updates, weights=None)``. ``updates`` is a stacked (n, d)
tensor, a list of 1-D tensors, a list of parameter lists or a list of state_dicts; the
aggregate comes back in the same structure ([d] for the first two). ``agg.last_report`` is a
dataclass: ``selected`` (original client indices that contributed), ``rejected_nonfinite``
(original indices dropped for NaN/Inf) and the rule's own diagnostics.

Every pass over G goes through ``robustagg.ops``. The only other arithmetic is on n-sized or
n x n tensors, and on [d] vectors after G has been reduced.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .. import ops
from .._errors import NonFiniteUpdateError, check_bool, check_float, check_int, check_weights  # noqa: F401  (re-exported to the aggregators)
from ..layout import flatten
from ..reference import acc_dtype

POLICIES = ("drop", "raise", "propagate")


@dataclass
class Report:
    """What one aggregation did. Client indices are the caller's original row numbers."""
    selected: list[int] | None = None
    rejected_nonfinite: list[int] = field(default_factory=list)


class Clients:
    """The rows still in play during one aggregation, with their original indices and weights.

    Each method runs one op over G under the aggregator's non-finite policy. The ops find
    non-finite rows in the same pass as their result (SPEC §3); under ``"drop"`` those rows
    leave ``G``, ``index`` and ``weights`` here, so later ops see only finite rows.
    """

    def __init__(self, G: torch.Tensor, weights: torch.Tensor | None, policy: str, backend: str | None):
        self.G = G
        self.weights = weights
        self.index = torch.arange(G.shape[0])
        self.rejected: list[int] = []
        self.policy = policy
        self.backend = backend

    @property
    def n(self) -> int:
        return self.G.shape[0]

    def ids(self, local: torch.Tensor) -> list[int]:
        """Original client indices of local rows (an index tensor or a bool mask)."""
        if local.dtype == torch.bool:
            local = local.nonzero().flatten()
        return self.index[local.cpu()].tolist()

    def all_ids(self) -> list[int]:
        return self.index.tolist()

    def weights_or_ones(self) -> torch.Tensor:
        if self.weights is None:
            return torch.ones(self.n, dtype=torch.float64, device=self.G.device)
        return self.weights

    def drop(self, bad: torch.Tensor) -> torch.Tensor:
        """Remove the local rows flagged in ``bad`` (bool[n]); returns the kept local indices."""
        bad = bad.to(self.G.device)
        original = self.ids(bad.cpu())
        if self.policy == "raise":
            raise NonFiniteUpdateError(original, "aggregator")
        kept = (~bad).nonzero().flatten()
        if kept.numel() == 0:
            raise ValueError(f"all n={self.n} client rows hold NaN or Inf; no finite row is left to aggregate")
        self.rejected += original
        self.G = self.G.index_select(0, kept)
        self.index = self.index[kept.cpu()]
        if self.weights is not None:
            self.weights = self.weights[kept]
            if float(self.weights.sum()) <= 0:
                raise ValueError(f"the weights of the finite clients {self.all_ids()} sum to 0; "
                                 "at least one finite client needs a weight > 0")
        return kept

    def run(self, op, *args, **kwargs):
        """A coordinate-wise op over the rows; ``args`` may be callables of this object (re-read after a drop)."""
        def call(policy):
            resolved = [a(self) if callable(a) else a for a in args]
            named = {k: (v(self) if callable(v) else v) for k, v in kwargs.items()}
            return op(self.G, *resolved, nonfinite=policy, backend=self.backend, **named)

        if self.policy == "propagate":
            return call("propagate")
        try:
            return call("raise")
        except NonFiniteUpdateError as err:
            bad = torch.zeros(self.n, dtype=torch.bool)
            bad[err.clients] = True
            self.drop(bad)
            return call("propagate")

    def stats(self, window=None, ref=None) -> ops.ClientStats:
        """``client_stats`` over the rows; its ``finite`` flag screens them in the same pass."""
        stats = ops.client_stats(self.G, window, ref, nonfinite="propagate", backend=self.backend)
        if self.policy == "propagate" or bool(stats.finite.all()):
            return stats
        return stats.select(self.drop(~stats.finite))

    def pairwise(self, op) -> torch.Tensor:
        """An [n, n] op (pairwise_sqdist / pairwise_cosine) over the rows.

        Under ``"drop"`` the op gives non-finite rows a NaN diagonal, which screens them without
        another pass over G.
        """
        policy = "propagate" if self.policy == "propagate" else "drop"
        M = op(self.G, nonfinite=policy, backend=self.backend)
        bad = M.diagonal().isnan()
        if policy == "propagate" or not bool(bad.any()):
            return M
        kept = self.drop(bad)
        return M[kept][:, kept]

    def weighted_mean(self, coef: torch.Tensor) -> torch.Tensor:
        r"""$\sum_i c_i G_i / \sum_i c_i$ for coefficients $c \ge 0$ (not all 0) aligned with the
        current rows, in one pass over G. A row found non-finite in this pass is dropped with its
        coefficient, and the mean is over the rest.

        ``rlr`` with theta=0 sets lr=+1 on every coordinate: it is the fused weighted mean.
        """
        coef = coef.to(device=self.G.device, dtype=torch.float64)
        start = self.index

        def current(rows):
            return coef[torch.searchsorted(start, rows.index).to(coef.device)]

        return self.run(ops.rlr, 0, weights=current)

    def combine(self, coef: torch.Tensor) -> torch.Tensor:
        r"""$\sum_i c_i G_i$ for coefficients $c \ge 0$ aligned with the current (screened) rows.

        Zero coefficients give a zero vector without reading G.
        """
        total = float(coef.sum())
        if total <= 0:
            return torch.zeros(self.G.shape[1], dtype=self.G.dtype, device=self.G.device)
        return self.weighted_mean(coef) * total


# ---------------------------------------------------------------- argument checks

def check_choice(owner: str, name: str, value, choices) -> str:
    if value not in choices:
        raise ValueError(f"{owner}: {name}={value!r} is not one of {tuple(choices)}")
    return value


def check_multiplier(owner: str, name: str, value: float, dtype: torch.dtype) -> float:
    """A factor of the output (a server learning rate) that fits the updates' arithmetic dtype, so
    that a 0 or +-1 it multiplies stays finite."""
    limit = torch.finfo(acc_dtype(dtype)).max
    return check_float(owner, name, value, -limit, limit)


def make_generator(generator: torch.Generator | None, seed: int | None) -> torch.Generator:
    """The aggregator's only source of randomness: ``generator``, else a CPU generator seeded
    with ``seed`` (0 when neither is given, so that runs repeat)."""
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        return generator
    return torch.Generator().manual_seed(0 if seed is None else int(seed))


def gaussian(d: int, std: float, like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """N(0, std^2 I) in d dimensions, drawn on the generator's device, in ``like``'s dtype and device."""
    z = torch.randn(d, generator=generator, dtype=torch.float64 if like.dtype == torch.float64 else torch.float32,
                    device=generator.device)
    return (z * std).to(device=like.device, dtype=like.dtype)


# ---------------------------------------------------------------- the base class

class Aggregator:
    """Base class: ``agg(updates, weights=None)`` flattens, aggregates, and rebuilds the structure.

    ``nonfinite``: ``"drop"`` (default) excludes clients holding NaN/Inf and lists them in
    ``last_report.rejected_nonfinite``; ``"raise"`` raises ``NonFiniteUpdateError``;
    ``"propagate"`` skips the checks. ``backend`` is passed to every op.

    ``weights`` (one per client, e.g. sample counts) are used only by rules whose
    ``uses_weights`` is True; the others document that they ignore them.
    """

    uses_weights = False

    def __init__(self, *, nonfinite: str = "drop", backend: str | None = None):
        self.nonfinite = check_choice(type(self).__name__, "nonfinite", nonfinite, POLICIES)
        self.backend = backend
        self.last_report: Report | None = None

    @property
    def name(self) -> str:
        return type(self).__name__

    def __call__(self, updates, weights=None):
        G, layout = flatten(updates)
        if G.shape[1] == 0:
            raise ValueError(f"{self.name}: the updates have d=0 coordinates; at least 1 is required")
        w = None if weights is None else check_weights(self.name, weights, G.shape[0]).to(G.device)
        rows = Clients(G, w, self.nonfinite, self.backend)
        self.check_n(G.shape[0])
        out, report = self.aggregate(rows, layout)
        report.rejected_nonfinite = sorted(rows.rejected)
        self.last_report = report
        return layout.unflatten(out)

    def check_n(self, n: int) -> None:
        """Raise a ValueError if the rule's parameters do not fit n clients (overridden per rule)."""

    def aggregate(self, rows: Clients, layout) -> tuple[torch.Tensor, Report]:
        """The rule itself: reduce ``rows.G`` to a [d] vector and say what happened."""
        raise NotImplementedError

    def __repr__(self):
        return f"{self.name}()"
