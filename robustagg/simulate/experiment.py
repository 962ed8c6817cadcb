"""The runs behind ``python -m robustagg simulate``: the presets, the defenses and attacks, one
training run per (defense, attack, seed), and the JSON document they make."""
from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, replace
from typing import Callable

import torch

from .. import aggregators as A
from .. import simulation as sim
from .._machine import commit, device_name
from . import claims
from .claims import NAIVE_MEAN

# "none" is the clean baseline and "backdoor" the targeted attack (robustagg.simulation.Backdoor);
# the others are robustagg.attacks functions with their defaults, gaussian's noise drawn from the
# run's seed.
ATTACKS = ("none", "backdoor", "lie", "min_max", "min_sum", "sign_flip", "ipm", "scaling", "gaussian", "nan_inject")


def defenses(n: int, f: int) -> dict[str, Callable[[], A.Aggregator]]:
    """One factory per aggregator of ``robustagg.aggregators`` (``default_aggregators``: the paper
    presets with the parameters that fit n and f), and the variants the claims compare with:
    RobustLR without its clipping, CosDen without amplification (kernel 1: max-pooling over 1x1
    windows is the identity), and the naive mean."""
    table = sim.default_aggregators(n, f)
    table["RobustLR-noclip"] = lambda: A.RobustLR(theta=f + 1)
    table["CosDen-noamp"] = lambda: A.CosDen(k_nearest=n - f, malicious_frac=f / n, kernel=1)
    table[NAIVE_MEAN] = lambda: A.FedAvg(nonfinite="propagate")
    return table


DEFENSES = tuple(defenses(20, 4))


@dataclass(frozen=True)
class Config:
    """One simulation: every aggregator against every attack, for every seed."""
    preset: str
    aggregators: tuple[str, ...]
    attacks: tuple[str, ...]
    rounds: int
    seeds: tuple[int, ...]
    clients: int = 20
    byzantine: int = 4
    alpha: float = 1.0

    def tasks(self) -> list[tuple[str, str, int]]:
        return [(agg, attack, seed) for agg in self.aggregators for attack in self.attacks for seed in self.seeds]


# quick: what the claims need (the seed defenses, the baselines SignGuard's paper compares with,
# the unamplified CosDen and the naive mean) against the attacks they name, plus Gaussian noise,
# the untargeted attack that FedAvg cannot absorb; 10 rounds fit the 3-minute budget on 2 cores.
# full: everything, 15 rounds.
PRESETS = {
    "quick": Config("quick", ("FedAvg", NAIVE_MEAN, "CoordinateMedian", "TrimmedMean", "Krum", "InvariantAggregator",
                              "RobustLR", "SparseFed", "SignGuard", "CosDen", "CosDen-noamp"),
                    ("none", "backdoor", "lie", "min_max", "gaussian", "nan_inject"), rounds=10, seeds=(0, 1, 2)),
    "full": Config("full", DEFENSES, ATTACKS, rounds=15, seeds=(0, 1, 2)),
}


def byzantine_clients(config: Config, attack: str, seed: int) -> list[int]:
    """The attacking clients of a run, drawn from the seed: ``config.byzantine`` of them, none for
    the clean baseline and one for ``nan_inject``, a single client that sends NaN (the other
    rules' parameters still assume f = ``config.byzantine``)."""
    count = {"none": 0, "nan_inject": min(1, config.byzantine)}.get(attack, config.byzantine)
    order = torch.randperm(config.clients, generator=torch.Generator().manual_seed(seed))
    return sorted(order[:count].tolist())


def attack_params(attack: str, seed: int) -> dict:
    return {"generator": torch.Generator().manual_seed(seed)} if attack == "gaussian" else {}


def run_one(config: Config, aggregator: str, attack: str, seed: int, data: sim.Digits | None = None) -> dict:
    """One training run, as an entry of the JSON document's ``runs``."""
    byzantine = byzantine_clients(config, attack, seed)
    history = sim.run(defenses(config.clients, config.byzantine)[aggregator](), rounds=config.rounds,
                      clients=config.clients, alpha=config.alpha, byzantine=byzantine,
                      attack=None if attack == "none" else attack, attack_params=attack_params(attack, seed),
                      seed=seed, data=data)
    rounds = []
    for r, (acc, asr, report, ms, error) in enumerate(zip(history.accuracy, history.asr, history.reports,
                                                          history.agg_ms, history.errors)):
        selected = None if report is None else report.selected
        rounds.append({"round": r + 1, "accuracy": acc, "asr": asr,
                       "byzantine_selected": None if selected is None else len(set(selected) & set(byzantine)),
                       "selected": selected, "rejected_nonfinite": None if report is None else report.rejected_nonfinite,
                       "agg_ms": ms, "error": error})
    return {"aggregator": aggregator, "attack": attack, "seed": seed, "byzantine": byzantine, "rounds": rounds,
            "final_accuracy": rounds[-1]["accuracy"], "final_asr": rounds[-1]["asr"]}


_worker_data: sim.Digits | None = None


def _start_worker():
    global _worker_data
    torch.set_num_threads(1)
    _worker_data = sim.load_digits_split()


def _run_in_worker(config: Config, aggregator: str, attack: str, seed: int) -> dict:
    return run_one(config, aggregator, attack, seed, _worker_data)


def run_all(config: Config, jobs: int | None = None, on_done: Callable[[dict], None] | None = None) -> list[dict]:
    """Every run of ``config``, in ``config.tasks()`` order, on ``jobs`` processes (default: one per
    core) of one torch thread each: the numbers for a seed do not depend on ``jobs``."""
    if jobs is None:
        jobs = os.cpu_count() or 1
    tasks = config.tasks()
    done = {}
    if jobs == 1:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            data = sim.load_digits_split()
            for task in tasks:
                done[task] = run_one(config, *task, data)
                if on_done:
                    on_done(done[task])
        finally:
            torch.set_num_threads(threads)
    else:
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_start_worker) as pool:
            futures = {pool.submit(_run_in_worker, config, *task): task for task in tasks}
            for future in as_completed(futures):
                done[futures[future]] = future.result()
                if on_done:
                    on_done(done[futures[future]])
    return [done[task] for task in tasks]


def document(config: Config, runs: list[dict], jobs: int) -> dict:
    """The JSON document: ``meta``, ``runs`` and the ``claims`` judged on them."""
    meta = {"preset": config.preset, "dataset": "digits", "clients": config.clients, "byzantine": config.byzantine,
            "alpha": config.alpha, "rounds": config.rounds, "seeds": list(config.seeds),
            "device": device_name(torch.device("cpu"), threads=1) + f", {jobs} processes", "commit": commit(),
            "aggregators": list(config.aggregators), "attacks": list(config.attacks),
            "local_training": {"steps": sim.LOCAL_STEPS, "batch_size": sim.BATCH_SIZE, "lr": sim.LOCAL_LR},
            "backdoor": asdict(sim.Backdoor()) | {"boost": f"clients / byzantine = {config.clients / config.byzantine:g}"
                                                  if config.byzantine else None},
            "torch": torch.__version__}
    return {"meta": meta, "runs": runs, "claims": claims.judge(runs)}


def with_overrides(config: Config, **changes) -> Config:
    """``config`` with the given fields replaced (None keeps a field as it is)."""
    return replace(config, **{k: v for k, v in changes.items() if v is not None})
