"""The same rules in other libraries, for ``python -m robustagg bench --peers`` (docs/backends.md).

``peer_rules(G, f)`` gives, for each rule that a peer library also implements, robustagg's
aggregator on G next to one thunk per installed peer, every one configured to compute the same
result (tests/test_bench_peers.py checks this in float64 and float32). A missing package drops its
thunks; a rule left with none is dropped (Bulyan, whose only peer is Flower, for a bfloat16 G).

What each thunk is handed is what a user of that library already holds, so that only per-round
work is timed:

- robustagg and the torch thunks take G itself.
- ByzFL takes G (a tensor: its torch path, on G's device), except a float64 G, which its torch
  path would cast to float32 (``check_vectors_type`` calls ``.float()``); there it takes the
  numpy array below, whose dtype its numpy path keeps.
- numpy takes ``G.numpy()``: a view of a CPU G, a host copy made once, outside the thunks, of a
  CUDA one. numpy has no bfloat16, so a bfloat16 G has no numpy or Flower thunks.
- Flower takes ``[([x_i], 1) for x_i in rows]``, its ``list[tuple[NDArrays, int]]`` with each
  client's update as one layer, built outside the thunks: Flower users hold NDArrays. Flower's
  own stacking of those arrays into one matrix happens inside its functions and is timed.

Conventions, mapped so that all compute the same thing:

- TrimmedMean(f), f values cut at each end: ByzFL ``TrMean(f)`` (the same count); Flower
  ``aggregate_trimmed_avg`` (the 1.42 name; there is no ``aggregate_trimmed_mean``) with
  ``proportiontocut = (f + 1/4) / n``: Flower cuts ``int(proportiontocut * n)`` at each end, and
  f / n itself can round to just below f (``int(1 / 49 * 49) == 0``); a quarter above f / n is
  exact and stays below Flower's bound 0.5 whenever n >= 2f + 1. numpy: ``np.sort`` then the mean
  of rows f .. n-f-1; torch the same with ``torch.sort``.
- CoordinateMedian: the mean of the two middle values for even n, as ``np.median`` (numpy, and
  Flower's ``aggregate_median``) and ByzFL's ``Median`` (np.median, or ``torch.quantile(q=0.5)``).
  ``torch.median`` returns the lower middle value, so the torch thunk is ``torch.median`` for odd
  n and the mean of ``torch.kthvalue`` at n/2 and n/2 + 1 for even n, labelled by which it is.
- Krum(f), the row with the least sum of squared distances to its n - f - 2 nearest others:
  Flower ``aggregate_krum(num_malicious=f, to_keep=0)`` counts the same; ByzFL's ``Krum(f)`` takes
  n - f neighbours counting the row itself (n - f - 1 others), so it is given f + 1.
- GeometricMedian: both run the smoothed Weiszfeld step with the same ``nu`` for exactly
  GEOMETRIC_MEDIAN_STEPS steps (robustagg's ``max_iter`` with ``tol=0``, ByzFL's ``T``). The start
  cannot be mapped: ByzFL starts at 0, robustagg at the mean, neither configurable. So the two do
  the same work per call and agree once the iteration has converged: on the benchmark's random
  rows (n = 50, d = 1e6) 10 steps agree to 4e-16 in float64 (to float32 rounding, 1e-6, in
  float32); a few rows in low dimension, or one huge row that drags the mean away, need more
  (the tests raise the step count to 100). nu is robustagg's default 1e-6 (ByzFL's is 0.1).
- CenteredClipping(tau, L): ByzFL ``CenteredClipping(m=None, L, tau)`` and robustagg's
  ``CenteredClipping(tau, iters=L)``. Both keep the output as the next call's center, so each thunk
  builds a fresh instance: every call is a first round from the zero center in both. tau is the
  norm of the mean of the first n // 10 rows, as the aggregator bench's server update; L = 3.
- Bulyan(f) with f <= (n - 3) // 4: Flower ``aggregate_bulyan(num_malicious=f,
  aggregation_rule=aggregate_krum, to_keep=0)``, on a fresh copy of the list each call (it pops the
  picked clients from its input). The selection counts as robustagg's (r - f - 2 nearest of the r
  remaining). Ties in distance to the median at the beta-th place: robustagg keeps the lower
  client index, Flower whichever ``np.argpartition`` puts first; so they agree unless two values
  equidistant from the median compete for the last place.
- Meamed(f), per coordinate the mean of the n - f values nearest the median: ByzFL ``Meamed(f)``
  (the same count, and numpy's median for an even n). Ties in distance to the median between
  different values at the last place: robustagg keeps the lower client index, ByzFL whichever
  ``np.argpartition`` (``torch.topk``) puts first.
- MDA with f = min(f, MDA_F): ByzFL ``MDA(f)`` walks all C(n, f) subsets of n - f clients in
  ``itertools.combinations`` order, in Python, and keeps the first of least diameter, the same
  lexicographically smallest subset as robustagg's exact search. At the benchmark's n = 50 and
  f = 10 that is C(50, 10) = 1e10 subsets, so both are given f = MDA_F = 2 (1225 subsets), named
  in the rule ("MDA(f=2)").
- MoNNA(f, idx=0): ByzFL ``MoNNA(f, idx=0)``; both count the trusted client among its n - f
  neighbours. Ties in distance at the last place: the lower index in robustagg, ``argpartition``'s
  order in ByzFL.
- CAF(f): ByzFL ``CAF(f)``, for f >= 1 (with f = 0 its loop never runs and it returns None, so
  there is no thunk). ByzFL estimates each iteration's top eigenpair with one power-method step
  from a random start (numpy's or torch's global RNG) where robustagg's is exact, and takes
  tau_max over all n clients, those at weight 0 included (a row far from the rest stays the
  largest and the loop then crawls: minutes for one row at 1e6 with honest spread 1, no end at
  1e300): its result is a random approximation of the rule, timed here, not the same result. On
  the benchmark's random rows its loop stops after a few iterations. The two agree where that
  step is exact (d = 1) and both loops stop at the same iteration (tests/test_bench_peers.py).
- SMEA with f = min(f, SMEA_F): ByzFL ``SMEA(f)`` runs one power-method step of d-sized work on
  each of the C(n, f) subsets, so both are given f = SMEA_F = 1 (n subsets), named in the rule.
  That step starts from a random vector, so its eigenvalues are random underestimates: the
  results agree where the least-eigenvalue subset is unambiguous (f rows far from the others),
  not in general.
- The pre-aggregators return their (n', d) matrix on both sides (robustagg's ``PreAggregator``
  called on G). NNM(f): ByzFL ``NNM(f)``, n - f neighbours the row itself included, ties as
  MoNNA's. ARC(f): ByzFL ``ARC(f)``, which writes the clipped rows into its input (here a view of
  G, or G itself), so its thunk hands it a copy of G, made inside the thunk and timed: robustagg
  leaves G as it is and writes a new matrix, the same traffic. ByzFL computes the clip count
  ``int((2 * f / n) * (n - f))`` in floating point, which rounds an exact integer down at some
  (n, f) (the first with n >= 2f + 3 is n = 242, f = 33); there it clips one row fewer than the
  exact floor, and the ByzFL thunk is left out. Bucketing(s=BUCKET_SIZE): ByzFL ``Bucketing(s)``
  draws its permutation from numpy's (or torch's) global RNG, robustagg from its seed
  (BUCKETING_SEED, a fresh instance each call, so every call draws the same permutation). The
  ByzFL thunk is handed robustagg's permutation: for the length of the call, the module's
  ``random_tool`` is replaced by one whose ``permutation`` gathers the rows in that order, and
  put back after, so ByzFL does its own gather and no global RNG is drawn from or changed.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import sys
import types
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from .. import aggregators as A
from .aggregators import BUCKET_SIZE, SMEA_F   # the aggregator bench's settings of the same rules

GEOMETRIC_MEDIAN_STEPS = 10
GEOMETRIC_MEDIAN_NU = 1e-6          # robustagg's default; ByzFL's is 0.1
CENTERED_CLIPPING_ITERS = 3
MDA_F = 2                           # ByzFL's MDA walks all C(n, f) subsets: 1225 at n = 50
BUCKETING_SEED = 0
PACKAGES = ("byzfl", "flwr", "numpy", "torch")


@dataclass
class PeerRule:
    name: str                               # the rule, e.g. "TrimmedMean(f=4)"
    robustagg: Callable[[], object]         # robustagg's implementation on G (auto backend)
    peers: dict[str, Callable[[], object]]  # label -> thunk on the same G
    bytes_read: int                         # G's bytes (the read floor of the rule)


def peer_versions() -> dict[str, str | None]:
    """The installed version of each peer package, None where it is not installed."""
    versions = {}
    for package in PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def byzfl_module(name: str):
    """``byzfl.<name>`` (``aggregators``, ``attacks``), or None when ByzFL is not installed.

    ``byzfl/__init__.py`` also imports ``byzfl.fed_framework`` and ``byzfl.benchmark``, which need
    torchvision; the Makefile installs ByzFL with ``--no-deps`` and no torchvision, which would
    pull a CUDA build of torch. The aggregators and attacks need only numpy, scipy, torch and
    ``byzfl.utils``. So unless ``byzfl`` is already imported, a bare package named ``byzfl`` whose
    ``__path__`` is the installed directory is registered: Python then runs the subpackage's own
    ``__init__``, never the top-level one. It stays registered for the process.
    """
    spec = importlib.util.find_spec("byzfl")
    if spec is None:
        return None
    if "byzfl" not in sys.modules:
        package = types.ModuleType("byzfl")
        package.__path__ = list(spec.submodule_search_locations)
        package.__spec__ = spec
        sys.modules["byzfl"] = package
    return importlib.import_module(f"byzfl.{name}")


def _flower_aggregate():
    """``flwr.server.strategy.aggregate``, or None when Flower is not installed."""
    if importlib.util.find_spec("flwr") is None:
        return None
    return importlib.import_module("flwr.server.strategy.aggregate")


@dataclass
class _Inputs:
    """G and what each library is handed for it (see the module docstring)."""
    G: torch.Tensor
    X: np.ndarray | None                         # numpy; None for bfloat16
    flower: list | None                          # Flower's list[tuple[NDArrays, int]]; None without X
    byzfl: torch.Tensor | np.ndarray             # G, or X for a float64 G

    @classmethod
    def of(cls, G: torch.Tensor) -> "_Inputs":
        X = None if G.dtype == torch.bfloat16 else G.cpu().numpy()   # a view of a CPU G
        return cls(G, X, None if X is None else [([row], 1) for row in X], X if G.dtype == torch.float64 else G)


def _torch_median(G: torch.Tensor) -> tuple[str, Callable[[], object]]:
    """torch's median in numpy's convention: torch.median is the lower middle value for even n."""
    n = G.shape[0]
    if n % 2:
        return "torch.median", lambda: G.median(dim=0).values
    return "torch.kthvalue (mean of the two middles)", \
        lambda: (G.kthvalue(n // 2, dim=0).values + G.kthvalue(n // 2 + 1, dim=0).values) / 2


def _trimmed_mean(x: _Inputs, byzfl, flower, f: int) -> tuple[str, Callable, dict]:
    n = x.G.shape[0]
    peers = {}
    if byzfl is not None:
        rule = byzfl.TrMean(f=f)
        peers["byzfl TrMean"] = lambda: rule(x.byzfl)
    if flower is not None and x.flower is not None:
        proportion = (f + 0.25) / n
        peers["flwr aggregate_trimmed_avg"] = lambda: flower.aggregate_trimmed_avg(x.flower, proportion)
    if x.X is not None:
        peers["numpy np.sort"] = lambda: np.sort(x.X, axis=0)[f:n - f].mean(axis=0)
    peers["torch.sort"] = lambda: x.G.sort(dim=0).values[f:n - f].mean(dim=0)
    agg = A.TrimmedMean(trim=f)
    return f"TrimmedMean(f={f})", lambda: agg(x.G), peers


def _coordinate_median(x: _Inputs, byzfl, flower) -> tuple[str, Callable, dict]:
    peers = {}
    if byzfl is not None:
        rule = byzfl.Median()
        peers["byzfl Median"] = lambda: rule(x.byzfl)
    if flower is not None and x.flower is not None:
        peers["flwr aggregate_median"] = lambda: flower.aggregate_median(x.flower)
    if x.X is not None:
        peers["numpy np.median"] = lambda: np.median(x.X, axis=0)
    label, thunk = _torch_median(x.G)
    peers[label] = thunk
    agg = A.CoordinateMedian()
    return "CoordinateMedian", lambda: agg(x.G), peers


def _krum(x: _Inputs, byzfl, flower, f: int) -> tuple[str, Callable, dict]:
    peers = {}
    if byzfl is not None:
        rule = byzfl.Krum(f=f + 1)   # n - (f + 1) neighbours, the row itself among them
        peers["byzfl Krum"] = lambda: rule(x.byzfl)
    if flower is not None and x.flower is not None:
        peers["flwr aggregate_krum"] = lambda: flower.aggregate_krum(x.flower, num_malicious=f, to_keep=0)
    agg = A.Krum(f)
    return f"Krum(f={f})", lambda: agg(x.G), peers


def _geometric_median(x: _Inputs, byzfl) -> tuple[str, Callable, dict]:
    steps, nu = GEOMETRIC_MEDIAN_STEPS, GEOMETRIC_MEDIAN_NU
    peers = {}
    if byzfl is not None:
        rule = byzfl.GeometricMedian(nu=nu, T=steps)
        peers["byzfl GeometricMedian"] = lambda: rule(x.byzfl)
    agg = A.GeometricMedian(nu=nu, max_iter=steps, tol=0.0)
    return f"GeometricMedian(nu={nu:g}, steps={steps})", lambda: agg(x.G), peers


def _centered_clipping(x: _Inputs, byzfl) -> tuple[str, Callable, dict]:
    n = x.G.shape[0]
    tau = float(x.G[: max(1, n // 10)].double().mean(dim=0).norm()) or 1.0
    iters = CENTERED_CLIPPING_ITERS
    peers = {}
    if byzfl is not None:
        peers["byzfl CenteredClipping"] = lambda: byzfl.CenteredClipping(L=iters, tau=tau)(x.byzfl)
    return (f"CenteredClipping(tau={tau:.3g}, iters={iters})",
            lambda: A.CenteredClipping(tau=tau, iters=iters)(x.G), peers)


def _bulyan(x: _Inputs, flower, f: int) -> tuple[str, Callable, dict]:
    f = min(f, (x.G.shape[0] - 3) // 4)
    peers = {}
    if flower is not None and x.flower is not None and hasattr(flower, "aggregate_bulyan"):
        peers["flwr aggregate_bulyan"] = lambda: flower.aggregate_bulyan(
            list(x.flower), num_malicious=f, aggregation_rule=flower.aggregate_krum, to_keep=0)
    agg = A.Bulyan(f)
    return f"Bulyan(f={f})", lambda: agg(x.G), peers


def _byzfl_only(x: _Inputs, byzfl, name: str, ours, theirs) -> tuple[str, Callable, dict]:
    """A rule whose one peer is ByzFL's: ``ours`` on G, and ``theirs(byzfl)``, ByzFL's rule (or
    None where it has none), on what ByzFL is handed."""
    rule = None if byzfl is None else theirs(byzfl)
    peers = {} if rule is None else {f"byzfl {type(rule).__name__}": lambda: rule(x.byzfl)}
    return name, lambda: ours(x.G), peers


def _byzfl_rules(x: _Inputs, byzfl, f: int) -> list[tuple[str, Callable, dict]]:
    """Meamed, MDA, MoNNA, CAF, SMEA and NNM: ByzFL's rules of the same names and parameters."""
    mda_f, smea_f = min(f, MDA_F), min(f, SMEA_F)
    return [
        _byzfl_only(x, byzfl, f"Meamed(f={f})", A.Meamed(f), lambda b: b.Meamed(f=f)),
        _byzfl_only(x, byzfl, f"MDA(f={mda_f})", A.MDA(mda_f), lambda b: b.MDA(f=mda_f)),
        _byzfl_only(x, byzfl, f"MoNNA(f={f}, idx=0)", A.MoNNA(f, idx=0), lambda b: b.MoNNA(f=f, idx=0)),
        # ByzFL's CAF(0) returns None
        _byzfl_only(x, byzfl, f"CAF(f={f})", A.CAF(f), lambda b: b.CAF(f=f) if f > 0 else None),
        _byzfl_only(x, byzfl, f"SMEA(f={smea_f})", A.SMEA(smea_f), lambda b: b.SMEA(f=smea_f)),
        _byzfl_only(x, byzfl, f"NNM(f={f})", A.NNM(f), lambda b: b.NNM(f=f)),
    ]


def _arc(x: _Inputs, byzfl, f: int) -> tuple[str, Callable, dict]:
    n = x.G.shape[0]
    peers = {}
    byzfl_clips_as_many = int((2 * f / n) * (n - f)) == 2 * f * (n - f) // n   # its float count, our exact one
    if byzfl is not None and byzfl_clips_as_many:
        rule = byzfl.ARC(f=f)
        copy = np.copy if isinstance(x.byzfl, np.ndarray) else torch.clone
        peers["byzfl ARC"] = lambda: rule(copy(x.byzfl))   # it clips rows in place
    agg = A.ARC(f)
    return f"ARC(f={f})", lambda: agg(x.G), peers


def _bucketing(x: _Inputs, byzfl) -> tuple[str, Callable, dict]:
    s, seed = BUCKET_SIZE, BUCKETING_SEED
    peers = {}
    if byzfl is not None:
        # the permutation robustagg's Bucketing(seed=seed) draws first (torch.randperm on its generator)
        order = torch.randperm(x.G.shape[0], generator=torch.Generator().manual_seed(seed))
        index = order.numpy() if isinstance(x.byzfl, np.ndarray) else order.to(x.G.device)
        our_permutation = types.SimpleNamespace(permutation=lambda vectors: vectors[index])
        module = sys.modules[byzfl.Bucketing.__module__]   # whose random_tool Bucketing calls
        rule = byzfl.Bucketing(s=s)

        def on_our_permutation():
            random_tool = module.random_tool
            module.random_tool = lambda vectors: our_permutation
            try:
                return rule(x.byzfl)
            finally:
                module.random_tool = random_tool
        peers["byzfl Bucketing"] = on_our_permutation
    return f"Bucketing(s={s})", lambda: A.Bucketing(s, seed=seed)(x.G), peers


def peer_rules(G: torch.Tensor, f: int) -> list[PeerRule]:
    """Each rule on G (n, d) by robustagg and by every installed peer, all computing the same result.

    ``f`` is the number of Byzantine clients assumed (TrimmedMean cuts f at each end, Krum scores
    n - f - 2 neighbours, Bulyan uses min(f, (n - 3) // 4), MDA min(f, MDA_F), SMEA min(f, SMEA_F));
    it needs n >= 2f + 3.
    """
    if not isinstance(G, torch.Tensor) or G.dim() != 2 or not G.is_floating_point():
        got = (f"shape {tuple(G.shape)}, dtype {G.dtype}" if isinstance(G, torch.Tensor) else type(G).__name__)
        raise TypeError(f"peer_rules: G must be a floating (n, d) tensor, got {got}")
    if isinstance(f, bool) or not isinstance(f, int) or f < 0 or G.shape[0] < 2 * f + 3:
        raise ValueError(f"peer_rules: f={f!r} is out of range for n={G.shape[0]} clients; "
                         f"allowed an int in [0, (n - 3) // 2] (Krum needs n >= 2f + 3)")
    x = _Inputs.of(G.detach())
    byzfl, flower = byzfl_module("aggregators"), _flower_aggregate()
    built = [
        _trimmed_mean(x, byzfl, flower, f),
        _coordinate_median(x, byzfl, flower),
        _krum(x, byzfl, flower, f),
        _geometric_median(x, byzfl),
        _centered_clipping(x, byzfl),
        _bulyan(x, flower, f),
        *_byzfl_rules(x, byzfl, f),
        _arc(x, byzfl, f),
        _bucketing(x, byzfl),
    ]
    g_bytes = G.numel() * G.element_size()
    return [PeerRule(name, ours, peers, g_bytes) for name, ours, peers in built if peers]
