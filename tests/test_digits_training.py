"""A newcomer's digits experiment with model deltas: a CNN with BatchNorm, 20 clients on a
Dirichlet(1) split, 15 rounds. Every aggregator, with the defaults that ``default_aggregators``
gives it, must train (test accuracy >= 0.8 without attack); a NaN client is rejected every round;
a paper preset still runs; the example script runs end to end."""
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from robustagg import aggregators as A
from robustagg import simulation as sim

CLIENTS, BYZANTINE, ROUNDS = 20, 4, 15
FACTORIES = sim.default_aggregators(CLIENTS, BYZANTINE)
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "digits_robust.py"


@pytest.fixture(scope="module")
def data():
    return sim.load_digits_split()


@pytest.fixture(autouse=True)
def one_thread():
    # conv layers this small run faster on one thread than on two busy ones, and the accuracies
    # then repeat exactly
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_the_table_covers_every_aggregator():
    exported = {name for name in A.__all__
                if isinstance(getattr(A, name), type) and issubclass(getattr(A, name), A.Aggregator)
                and name != "Aggregator"}
    assert set(FACTORIES) == exported
    for name, make in FACTORIES.items():
        assert type(make()).__name__ == name


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_every_aggregator_trains_on_deltas(name, data):
    history = sim.run(FACTORIES[name](), rounds=ROUNDS, clients=CLIENTS, alpha=1.0, seed=0, data=data)
    assert len(history.accuracy) == ROUNDS
    assert history.accuracy[-1] >= 0.8, f"{name}: accuracy per round {history.accuracy}"


def test_a_nan_client_is_rejected_every_round_and_training_goes_on(data):
    history = sim.run(A.TrimmedMean(trim=BYZANTINE), rounds=ROUNDS, clients=CLIENTS, byzantine=[3],
                      attack="nan_inject", seed=0, data=data)
    assert [r.rejected_nonfinite for r in history.reports] == [[3]] * ROUNDS
    assert history.accuracy[-1] >= 0.8


def test_a_paper_preset_still_runs(data):
    # SparseFed's paper momentum (rho = 0.9) on deltas: at k = d/10 the top-k takes most
    # coordinates often enough that the momentum does not overshoot
    agg = A.SparseFed.paper(k=sim.parameter_count() // 10)
    history = sim.run(agg, rounds=ROUNDS, clients=CLIENTS, seed=0, data=data)
    assert agg.rho == 0.9 and float(agg.momentum.abs().max()) > 0
    assert history.accuracy[-1] >= 0.8


def test_a_run_repeats_exactly_for_a_seed(data):
    first = sim.run(A.FedAvg(), rounds=2, seed=1, data=data)
    second = sim.run(A.FedAvg(), rounds=2, seed=1, data=data)
    assert first.accuracy == second.accuracy


def test_the_example_script_runs_and_the_robust_rule_trains():
    start = time.monotonic()
    done = subprocess.run([sys.executable, str(EXAMPLE)], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    assert time.monotonic() - start < 180
    final = dict(re.findall(r"^final accuracy of (\w+): ([0-9.]+)", done.stdout, flags=re.M))
    assert set(final) == {"FedAvg", "MultiKrum"}, done.stdout
    assert float(final["MultiKrum"]) >= 0.8 > float(final["FedAvg"])
