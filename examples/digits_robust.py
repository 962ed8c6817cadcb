"""Robust aggregation end to end: 20 clients train a small CNN on scikit-learn's digits (a
Dirichlet(1) non-IID split); 4 of them are Byzantine and send -4 times the honest clients' mean
delta (a scaled sign flip: the mean of all 20 deltas is 0). The server aggregates with FedAvg,
which then stalls, and with Multi-Krum, which averages the n - f deltas closest to the others.

    python examples/digits_robust.py

Each round is the loop of any FL code: every client trains from the global model, its update is
its delta (client - global), the attacker replaces the Byzantine deltas, the server aggregates
the deltas and adds the result to the global model.
"""
import time

import torch

from robustagg import aggregators, attacks, fl
from robustagg.simulation import accuracy, dirichlet_split, load_digits_split, local_sgd, make_model, snapshot

CLIENTS = 20
BYZANTINE = [0, 1, 2, 3]
ROUNDS = 15


def train(aggregator, seed=0):
    data = load_digits_split()
    parts = dirichlet_split(data.y_train, CLIENTS, alpha=1.0, seed=seed)
    model = make_model(seed)
    global_state = snapshot(model)
    generator = torch.Generator().manual_seed(seed)
    for round_ in range(1, ROUNDS + 1):
        states = [local_sgd(model, global_state, data.x_train[p], data.y_train[p], steps=5, batch_size=32,
                            lr=0.2, generator=generator) for p in parts]
        updates = fl.deltas(states, global_state)                                  # client - global
        updates = attacks.apply(updates, BYZANTINE, attacks.sign_flip, scale=4.0)  # the Byzantine deltas
        global_state = fl.apply_update(global_state, aggregator(updates))          # global + aggregate
        acc = accuracy(model, global_state, data.x_test, data.y_test)
        if round_ % 5 == 0:
            print(f"  round {round_:2d}: test accuracy {acc:.3f}")
    return acc


if __name__ == "__main__":
    torch.set_num_threads(1)
    for aggregator in (aggregators.FedAvg(), aggregators.MultiKrum(f=len(BYZANTINE))):
        start = time.perf_counter()
        print(f"{aggregator.name}, {len(BYZANTINE)} of {CLIENTS} clients sending -4 x the honest mean:")
        acc = train(aggregator)
        print(f"final accuracy of {aggregator.name}: {acc:.3f}  ({time.perf_counter() - start:.1f} s)")
