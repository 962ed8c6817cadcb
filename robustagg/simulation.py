"""A small federation on scikit-learn's digits: data, clients, a model and the round loop.

Everything runs on the CPU in seconds and needs no download. The pieces are meant to be reused:

* ``load_digits_split()``: a fixed train/test split of the 1,797 8x8 digits, with a small clean
  slice of the train split held out as the server's root dataset (FLTrust's);
* ``dirichlet_split(labels, clients, alpha, seed)``: a non-IID split over clients;
* ``DigitsCNN``: a CNN of 10k parameters with a BatchNorm layer, and ``make_model(seed)``;
* ``local_sgd(...)``: a client's local training from the global state, and ``accuracy``;
* ``run(aggregator, ...)``: the whole loop, one round being
  deltas -> attack -> aggregate -> ``apply_update``, returning the test accuracy of every round;
* ``default_aggregators(n, f, d)``: every aggregator of ``robustagg.aggregators``, constructed
  with parameters that fit n clients of which f may be Byzantine.

A run is deterministic for a seed at a fixed number of torch threads (setting that number is the
caller's business).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

from . import aggregators as A
from . import attacks, fl
from ._errors import check_float, check_int

TEST_SIZE = 360     # 20% of the 1,797 digits
ROOT_SIZE = 100     # the server's clean root dataset (FLTrust uses 100 examples)


@dataclass(frozen=True)
class Digits:
    """The digits as float32 images (N, 1, 8, 8) in [0, 1] and int64 labels."""
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    x_root: torch.Tensor
    y_root: torch.Tensor


def load_digits_split() -> Digits:
    """The same split on every call: a stratified test set of TEST_SIZE examples, and ROOT_SIZE
    stratified examples of the rest held out for the server; the clients share the remainder."""
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    x_rest, x_test, y_rest, y_test = train_test_split(x, y, test_size=TEST_SIZE, stratify=y, random_state=0)
    x_train, x_root, y_train, y_root = train_test_split(x_rest, y_rest, test_size=ROOT_SIZE, stratify=y_rest,
                                                        random_state=0)
    as_tensors = (lambda a, b: (torch.from_numpy(a), torch.from_numpy(b).long()))
    return Digits(*as_tensors(x_train, y_train), *as_tensors(x_test, y_test), *as_tensors(x_root, y_root))


def dirichlet_split(labels: torch.Tensor, clients: int, alpha: float, seed: int = 0,
                    min_size: int = 10) -> list[torch.Tensor]:
    """Indices of each client's examples: every class is shared out in proportions drawn from
    Dirichlet(alpha * 1) (small alpha: few classes per client). Draws repeat until every client
    holds at least ``min_size`` examples, so that a batch never comes from an empty client."""
    clients = check_int("dirichlet_split", "clients", clients, 1)
    alpha = check_float("dirichlet_split", "alpha", alpha, 0.0, lo_open=True)
    if clients * min_size > labels.numel():
        raise ValueError(f"clients={clients} x min_size={min_size} exceeds the {labels.numel()} examples")
    rng = np.random.default_rng(seed)
    y = labels.numpy()
    for _ in range(1000):
        parts = [[] for _ in range(clients)]
        for c in np.unique(y):
            members = rng.permutation(np.flatnonzero(y == c))
            cuts = (np.cumsum(rng.dirichlet(np.full(clients, alpha)))[:-1] * members.size).astype(int)
            for part, chunk in zip(parts, np.split(members, cuts)):
                part.extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            return [torch.tensor(sorted(p), dtype=torch.int64) for p in parts]
    raise ValueError(f"no Dirichlet({alpha}) split in 1000 draws gives each of {clients} clients "
                     f"{min_size} examples; raise alpha or lower clients")


class DigitsCNN(nn.Module):
    """conv 3x3 (16 channels) - BatchNorm - ReLU - max-pool 2 - linear 144 x 64 - ReLU - linear
    64 x 10: 10,122 parameters, and BatchNorm's running_mean, running_var and num_batches_tracked
    buffers. One convolution only: on a CPU it costs more than the rest of a training step."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(144, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, x):
        return self.classifier(self.features(x))


def make_model(seed: int = 0) -> DigitsCNN:
    """A DigitsCNN initialised from ``seed`` (the global torch RNG is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return DigitsCNN()


def snapshot(model: nn.Module) -> dict:
    """A copy of the model's state_dict (buffers included) that later training does not change."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def local_sgd(model: nn.Module, global_state: dict, x: torch.Tensor, y: torch.Tensor, steps: int,
              batch_size: int, lr: float, generator: torch.Generator) -> dict:
    """``steps`` minibatch SGD steps from ``global_state`` on (x, y), in epochs of a random order
    drawn from ``generator``; returns the client's new state_dict (buffers included)."""
    model.load_state_dict(global_state)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    order = torch.empty(0, dtype=torch.int64)
    for _ in range(steps):
        if order.numel() < min(batch_size, x.shape[0]):
            order = torch.cat([order, torch.randperm(x.shape[0], generator=generator)])
        batch, order = order[:batch_size], order[batch_size:]
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
        optimizer.step()
    return snapshot(model)


@torch.no_grad()
def accuracy(model: nn.Module, state: dict, x: torch.Tensor, y: torch.Tensor) -> float:
    """Test accuracy of ``state`` (BatchNorm in eval mode: it uses the running statistics)."""
    model.load_state_dict(state)
    model.eval()
    return float((model(x).argmax(dim=1) == y).double().mean())


def parameter_count(model: nn.Module | None = None) -> int:
    """Trainable parameters of ``model`` (a DigitsCNN by default)."""
    return sum(p.numel() for p in (make_model() if model is None else model).parameters())


# ---------------------------------------------------------------- aggregators for n and f

# The L2 bound of NormClipping and CenteredClipping: about a client's delta norm on this model
# with the local training below (0.8-1.0 in the first round, 0.2-1.3 by round 15).
NORM_BOUND = 1.0


def default_aggregators(n: int, f: int, d: int | None = None) -> dict[str, Callable[[], A.Aggregator]]:
    """One factory per aggregator of ``robustagg.aggregators``, with parameters that fit n clients
    of which f may be Byzantine, for updates of d coordinates (a DigitsCNN's parameter count by
    default; only SparseFed's k depends on it).

    A rule's own defaults are kept wherever it has them. The other values: f where a rule takes
    the number of Byzantine clients (TrimmedMean trims f per side); RobustLR's theta = f + 1, more
    agreeing votes than the Byzantine clients can cast; the density rules' k_nearest = n - f and
    malicious_frac = f / n; InvariantAggregator's tau = 0.2 (the paper's smaller value);
    SparseFed's k = d / 10; ``NORM_BOUND`` for the clipping rules. FLTrust and FLTrustAmp start
    without a root update: ``run`` gives them the server's update on the root dataset every round.
    """
    n = check_int("default_aggregators", "n", n, 1)
    f = check_int("default_aggregators", "f", f, 0, n - 1, " (at least one honest client)")
    d = parameter_count() if d is None else d
    return {
        "FedAvg": lambda: A.FedAvg(),
        "CoordinateMedian": lambda: A.CoordinateMedian(),
        "TrimmedMean": lambda: A.TrimmedMean(trim=f),
        "Krum": lambda: A.Krum(f),
        "MultiKrum": lambda: A.MultiKrum(f),
        "MultiKrumCos": lambda: A.MultiKrumCos(f),
        "Bulyan": lambda: A.Bulyan(f),
        "SignSGD": lambda: A.SignSGD(),
        "NormClipping": lambda: A.NormClipping(max_norm=NORM_BOUND),
        "GeometricMedian": lambda: A.GeometricMedian(),
        "CenteredClipping": lambda: A.CenteredClipping(tau=NORM_BOUND),
        "DnC": lambda: A.DnC(f),
        "InvariantAggregator": lambda: A.InvariantAggregator(tau=0.2),
        "RobustLR": lambda: A.RobustLR(theta=f + 1),
        "SparseFed": lambda: A.SparseFed(k=max(1, d // 10)),
        "SignGuard": lambda: A.SignGuard(),
        "CosDen": lambda: A.CosDen(k_nearest=n - f, malicious_frac=f / n),
        "EuDen": lambda: A.EuDen(k_nearest=n - f, malicious_frac=f / n),
        "MgDen": lambda: A.MgDen(k_nearest=n - f, malicious_frac=f / n),
        "FLTrust": lambda: A.FLTrust(),
        "FLTrustAmp": lambda: A.FLTrustAmp(),
    }


# ---------------------------------------------------------------- the round loop

# Local training: 5 steps of batch 32 (a few epochs of a client's 40-130 examples over a run)
# reach 0.95 test accuracy with FedAvg in 15 rounds, at 5 s a run on one CPU thread.
LOCAL_STEPS = 5
LOCAL_LR = 0.2
BATCH_SIZE = 32


@dataclass
class History:
    """What ``run`` saw: the test accuracy after every round, and the aggregator's report of it."""
    accuracy: list[float] = field(default_factory=list)
    reports: list = field(default_factory=list)


def run(aggregator: A.Aggregator, rounds: int = 15, clients: int = 20, alpha: float = 1.0, byzantine=(),
        attack=None, attack_params: dict | None = None, seed: int = 0, local_steps: int = LOCAL_STEPS,
        lr: float = LOCAL_LR, batch_size: int = BATCH_SIZE, data: Digits | None = None) -> History:
    """Federated training of a DigitsCNN with ``aggregator``.

    Every round each client trains ``local_steps`` SGD steps from the global state; their deltas
    (client - global, ``robustagg.fl.deltas``) go to the aggregator with sample-count weights,
    after ``attack`` (a name in ``robustagg.attacks.ATTACKS`` or an attack function, called with
    ``attack_params``) has replaced the deltas of the ``byzantine`` clients (client indices; they
    train like the others first); the server adds the aggregate (``robustagg.fl.apply_update``).
    FLTrust and FLTrustAmp get the server's own delta on the root dataset as ``root_update``.
    ``data`` defaults to ``load_digits_split()``.
    """
    rounds = check_int("run", "rounds", rounds, 1)
    byzantine = list(byzantine)
    if byzantine and attack is None:
        raise ValueError(f"byzantine={byzantine} needs an attack: a name of robustagg.attacks.ATTACKS or a function")
    if isinstance(attack, str):
        if attack not in attacks.ATTACKS:
            raise ValueError(f"attack={attack!r} is not one of {tuple(attacks.ATTACKS)}")
        attack = attacks.ATTACKS[attack]
    data = load_digits_split() if data is None else data
    parts = dirichlet_split(data.y_train, clients, alpha, seed)
    weights = torch.tensor([float(p.numel()) for p in parts], dtype=torch.float64)
    model = make_model(seed)
    global_state = snapshot(model)
    generator = torch.Generator().manual_seed(seed)
    history = History()
    for _ in range(rounds):
        states = [local_sgd(model, global_state, data.x_train[p], data.y_train[p], local_steps, batch_size, lr,
                            generator) for p in parts]
        updates = fl.deltas(states, global_state)
        if byzantine:
            updates = attacks.apply(updates, byzantine, attack, **(attack_params or {}))
        if isinstance(aggregator, A.FLTrust):
            root = local_sgd(model, global_state, data.x_root, data.y_root, local_steps, batch_size, lr, generator)
            aggregator.root_update = fl.deltas([root], global_state)[0]
        global_state = fl.apply_update(global_state, aggregator(updates, weights))
        history.accuracy.append(accuracy(model, global_state, data.x_test, data.y_test))
        history.reports.append(aggregator.last_report)
    return history
