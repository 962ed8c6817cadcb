"""A small federation on scikit-learn's digits: data, clients, a model and the round loop.

Everything runs on the CPU in seconds and needs no download. The pieces are meant to be reused:

* ``load_digits_split()``: a fixed train/test split of the 1,797 8x8 digits, with a small clean
  slice of the train split held out as the server's root dataset (FLTrust's);
* ``dirichlet_split(labels, clients, alpha, seed)``: a non-IID split over clients;
* ``DigitsCNN``: a CNN of 10k parameters with a BatchNorm layer, and ``make_model(seed)``;
* ``local_sgd(...)``: a client's local training from the global state, ``train_clients(...)``
  the same for every client at once (stacked), and ``accuracy``;
* ``Backdoor``: the targeted attack (a trigger patch, relabelling, boosted deltas) and its
  success rate;
* ``run(aggregator, ...)``: the whole loop, one round being
  deltas -> attack -> aggregate -> ``apply_update``, returning what every round measured;
* ``default_aggregators(n, f, d)``: every aggregator of ``robustagg.aggregators``, constructed
  with parameters that fit n clients of which f may be Byzantine.

A run is deterministic for a seed at a fixed number of torch threads (setting that number is the
caller's business).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

from . import aggregators as A
from . import attacks, fl
from ._checks import check_float, check_int

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


def batch_indices(size: int, steps: int, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """(steps, batch_size) positions in a client's ``size`` examples: consecutive batches of a
    stream of random permutations drawn from ``generator``. A batch may span two epochs, and a
    client with fewer than ``batch_size`` examples sees some of them twice in one batch, so every
    step has ``batch_size`` examples (which lets ``train_clients`` stack the clients)."""
    need = steps * batch_size
    epochs = [torch.randperm(size, generator=generator) for _ in range(-(-need // size))]
    return torch.cat(epochs)[:need].view(steps, batch_size)


def local_sgd(model: nn.Module, global_state: dict, x: torch.Tensor, y: torch.Tensor, steps: int,
              batch_size: int, lr: float, generator: torch.Generator) -> dict:
    """``steps`` minibatch SGD steps from ``global_state`` on (x, y), the batches drawn by
    ``batch_indices``; returns the client's new state_dict (buffers included)."""
    model.load_state_dict(global_state)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    for batch in batch_indices(x.shape[0], steps, batch_size, generator):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
        optimizer.step()
    return snapshot(model)


def train_clients(global_state: dict, x: torch.Tensor, y: torch.Tensor, parts: list[torch.Tensor], steps: int,
                  batch_size: int, lr: float, generator: torch.Generator) -> list[dict]:
    """``local_sgd`` of a DigitsCNN for every client at once: client c trains on ``x[parts[c]]``.

    The clients' models are stacked: one grouped convolution (a group per client), BatchNorm over
    the stacked channels (so each client's statistics are its own), and batched matrix products;
    the loss is the sum of the clients' mean losses, so each client's gradient is its own. The
    batches are drawn client after client, as ``local_sgd`` called for each client in turn with
    the same generator draws them, and the states agree with those to float32 rounding
    (tests/test_simulate.py). Three times faster than that loop on a CPU.
    """
    clients = len(parts)
    batches = torch.stack([part[batch_indices(part.numel(), steps, batch_size, generator)] for part in parts], 1)
    stacked = {k: v.detach().clone().expand(clients, *v.shape).contiguous() for k, v in global_state.items()}
    conv_w, conv_b, bn_w, bn_b, fc1_w, fc1_b, fc2_w, fc2_b = params = [
        stacked[k].requires_grad_() for k in ("features.0.weight", "features.0.bias", "features.1.weight",
                                              "features.1.bias", "classifier.1.weight", "classifier.1.bias",
                                              "classifier.3.weight", "classifier.3.bias")]
    running_mean = stacked["features.1.running_mean"].view(-1)
    running_var = stacked["features.1.running_var"].view(-1)
    channels = conv_w.shape[1]
    optimizer = torch.optim.SGD(params, lr=lr)
    for batch in batches:                                              # (clients, batch_size)
        h = x[batch].transpose(0, 1).reshape(batch_size, clients * x.shape[1], *x.shape[2:])
        h = nn.functional.conv2d(h, conv_w.view(clients * channels, *conv_w.shape[2:]), conv_b.view(-1),
                                 groups=clients)
        h = nn.functional.batch_norm(h, running_mean, running_var, bn_w.view(-1), bn_b.view(-1), training=True)
        h = nn.functional.max_pool2d(nn.functional.relu(h), 2)
        h = h.view(batch_size, clients, -1).transpose(0, 1)           # (clients, batch, features)
        h = nn.functional.relu(torch.baddbmm(fc1_b.unsqueeze(1), h, fc1_w.transpose(1, 2)))
        logits = torch.baddbmm(fc2_b.unsqueeze(1), h, fc2_w.transpose(1, 2))
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y[batch].reshape(-1),
                                           reduction="sum") / batch_size
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    stacked["features.1.num_batches_tracked"] += steps
    return [{k: v[c].detach().clone() for k, v in stacked.items()} for c in range(clients)]


@torch.no_grad()
def accuracy(model: nn.Module, state: dict, x: torch.Tensor, y: torch.Tensor) -> float:
    """Test accuracy of ``state`` (BatchNorm in eval mode: it uses the running statistics). An
    example whose logits are not all finite counts as wrong: a NaN model classifies nothing,
    although argmax would call it class 0."""
    model.load_state_dict(state)
    model.eval()
    logits = model(x)
    correct = (logits.argmax(dim=1) == y) & torch.isfinite(logits).all(dim=1)
    return float(correct.double().mean())


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
    SparseFed's k = d / 10; ``NORM_BOUND`` for the clipping rules, and as the clip of SparseFed
    (step 1 of its algorithm) and of RobustLR (its paper's combination with norm clipping, which
    the vote needs against boosted updates: the vote counts signs, and on the coordinates it
    passes the mean carries their size). FLTrust and FLTrustAmp start without a root update:
    ``run`` gives them the server's update on the root dataset every round. MoNNA trusts client 0
    (its rule assumes that client honest). The Pipeline is nearest-neighbour mixing before the
    trimmed mean, the pairing Allouah et al. (2023) recommend.
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
        "RobustLR": lambda: A.RobustLR(theta=f + 1, clip=NORM_BOUND),
        "SparseFed": lambda: A.SparseFed(k=max(1, d // 10), clip=NORM_BOUND),
        "SignGuard": lambda: A.SignGuard(),
        "CosDen": lambda: A.CosDen(k_nearest=n - f, malicious_frac=f / n),
        "EuDen": lambda: A.EuDen(k_nearest=n - f, malicious_frac=f / n),
        "MgDen": lambda: A.MgDen(k_nearest=n - f, malicious_frac=f / n),
        "FLTrust": lambda: A.FLTrust(),
        "FLTrustAmp": lambda: A.FLTrustAmp(),
        "Meamed": lambda: A.Meamed(f),
        "MDA": lambda: A.MDA(f),
        "MoNNA": lambda: A.MoNNA(f),
        "CAF": lambda: A.CAF(f),
        "SMEA": lambda: A.SMEA(f),
        "Pipeline": lambda: A.Pipeline(A.NNM(f), A.TrimmedMean(trim=f)),
    }


# ---------------------------------------------------------------- the backdoor

@dataclass(frozen=True)
class Backdoor:
    r"""The targeted attack of Bagdasaryan et al. (AISTATS 2020), on digits.

    Each Byzantine client stamps ``poison_frac`` of its examples (drawn once per run) with the
    trigger, a bright ``patch`` x ``patch`` square in the top-left corner where digits are blank,
    relabels them ``target``, trains on them with the rest of its data as an honest client
    would, and sends its delta times ``boost``. Model replacement scales by $n/\eta$ for one
    attacker and server learning rate $\eta = 1$; ``boost=None`` shares that among the f
    attackers: n / f each. The success rate is the fraction of triggered test images, not of
    the target class, that the model classifies as ``target``.
    """
    target: int = 0
    poison_frac: float = 0.5
    boost: float | None = None
    patch: int = 2

    def __post_init__(self):
        check_int("Backdoor", "target", self.target, 0, 9)
        check_float("Backdoor", "poison_frac", self.poison_frac, 0.0, 1.0)
        check_int("Backdoor", "patch", self.patch, 1, 8)
        if self.boost is not None:
            check_float("Backdoor", "boost", self.boost, 0.0, lo_open=True)

    def stamp(self, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        x[..., :self.patch, :self.patch] = 1.0
        return x

    def poison(self, data: Digits, parts: list[torch.Tensor], byzantine: list[int],
               generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """The train set with stamped, relabelled copies appended, and the clients' index lists
        into it: each Byzantine client's chosen examples are swapped for their copies."""
        xs, ys, parts = [data.x_train], [data.y_train], list(parts)
        size = data.x_train.shape[0]
        for i in byzantine:
            chosen = torch.randperm(parts[i].numel(), generator=generator)[:round(self.poison_frac * parts[i].numel())]
            copies = torch.arange(size, size + chosen.numel())
            xs.append(self.stamp(data.x_train[parts[i][chosen]]))
            ys.append(torch.full((chosen.numel(),), self.target, dtype=torch.int64))
            parts[i] = parts[i].clone()
            parts[i][chosen] = copies
            size += chosen.numel()
        return torch.cat(xs), torch.cat(ys), parts

    def boost_for(self, clients: int, byzantine: int) -> float:
        return clients / byzantine if self.boost is None else self.boost

    def success_rate(self, model: nn.Module, state: dict, data: Digits) -> float:
        others = data.y_test != self.target
        return accuracy(model, state, self.stamp(data.x_test[others]), torch.full_like(data.y_test[others], self.target))


# ---------------------------------------------------------------- the round loop

# Local training: 5 steps of batch 32 (a few epochs of a client's 40-130 examples over a run)
# reach 0.95 test accuracy with FedAvg in 15 rounds, at 1.5 s a run on one CPU thread.
LOCAL_STEPS = 5
LOCAL_LR = 0.2
BATCH_SIZE = 32


@dataclass
class History:
    """What ``run`` saw after every round: the test accuracy, the backdoor's success rate (for the
    default ``Backdoor`` trigger when the attack is another: the base rate), the aggregator's
    report, the milliseconds the aggregator took, and the aggregator's error message in a round
    where it raised a ValueError (its report is then None and the global state stays as it was,
    as a server keeps its model when it gets no aggregate)."""
    accuracy: list[float] = field(default_factory=list)
    asr: list[float] = field(default_factory=list)
    reports: list = field(default_factory=list)
    agg_ms: list[float] = field(default_factory=list)
    errors: list[str | None] = field(default_factory=list)


def _boosted(update: dict, factor: float) -> dict:
    return {k: v * factor if v.is_floating_point() else v for k, v in update.items()}


def run(aggregator: A.Aggregator, rounds: int = 15, clients: int = 20, alpha: float = 1.0, byzantine=(),
        attack=None, attack_params: dict | None = None, seed: int = 0, local_steps: int = LOCAL_STEPS,
        lr: float = LOCAL_LR, batch_size: int = BATCH_SIZE, data: Digits | None = None) -> History:
    """Federated training of a DigitsCNN with ``aggregator``.

    Every round each client trains ``local_steps`` SGD steps from the global state
    (``train_clients``); their deltas (client - global, ``robustagg.fl.deltas``) go to the
    aggregator with sample-count weights, and the server adds the aggregate
    (``robustagg.fl.apply_update``). ``attack`` acts on the ``byzantine`` clients (indices):
    ``"backdoor"`` poisons their data and boosts their deltas (``Backdoor(**attack_params)``);
    any other name in ``robustagg.attacks.ATTACKS``, or an attack function, replaces their deltas
    (they train like the others first) and is called with ``attack_params``. FLTrust and
    FLTrustAmp get the server's own delta on the root dataset as ``root_update``. ``data``
    defaults to ``load_digits_split()``.
    """
    rounds = check_int("run", "rounds", rounds, 1)
    byzantine = list(byzantine)
    if byzantine and attack is None:
        raise ValueError(f"byzantine={byzantine} needs an attack: 'backdoor', a name of robustagg.attacks.ATTACKS "
                         "or a function")
    backdoor = Backdoor(**(attack_params or {})) if attack == "backdoor" else Backdoor()
    if isinstance(attack, str) and attack != "backdoor":
        if attack not in attacks.ATTACKS:
            raise ValueError(f"attack={attack!r} is not 'backdoor' or one of {tuple(attacks.ATTACKS)}")
        attack = attacks.ATTACKS[attack]
    data = load_digits_split() if data is None else data
    parts = dirichlet_split(data.y_train, clients, alpha, seed)
    weights = torch.tensor([float(p.numel()) for p in parts], dtype=torch.float64)
    model = make_model(seed)
    global_state = snapshot(model)
    generator = torch.Generator().manual_seed(seed)
    x_train, y_train = data.x_train, data.y_train
    if attack == "backdoor" and byzantine:
        x_train, y_train, parts = backdoor.poison(data, parts, byzantine, generator)
    history = History()
    for _ in range(rounds):
        states = train_clients(global_state, x_train, y_train, parts, local_steps, batch_size, lr, generator)
        updates = fl.deltas(states, global_state)
        if attack == "backdoor":
            factor = backdoor.boost_for(clients, len(byzantine)) if byzantine else 1.0
            updates = [_boosted(u, factor) if i in byzantine else u for i, u in enumerate(updates)]
        elif byzantine:
            updates = attacks.apply(updates, byzantine, attack, **(attack_params or {}))
        if isinstance(aggregator, A.FLTrust):
            root = local_sgd(model, global_state, data.x_root, data.y_root, local_steps, batch_size, lr, generator)
            aggregator.root_update = fl.deltas([root], global_state)[0]
        start = time.perf_counter()
        try:
            aggregate, error = aggregator(updates, weights), None
        except ValueError as e:   # the rule cannot run on the clients left, e.g. Bulyan's n >= 4f + 3
            aggregate, error = None, str(e)
        history.agg_ms.append(1e3 * (time.perf_counter() - start))
        if aggregate is not None:
            global_state = fl.apply_update(global_state, aggregate)
        history.accuracy.append(accuracy(model, global_state, data.x_test, data.y_test))
        history.asr.append(backdoor.success_rate(model, global_state, data))
        history.reports.append(None if error else aggregator.last_report)
        history.errors.append(error)
    return history
