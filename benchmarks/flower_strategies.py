"""Time ``aggregate_train`` of RobustStrategy against Flower's own robust strategies.

Both sides get the same replies: n clients' ArrayRecords at the shapes of a preset model
(resnet18-cifar by default), equal sample counts, built afresh before every call because Flower's
FedMedian, FedTrimmedAvg and Bulyan consume the arrays of the replies they aggregate. The timed
call includes reading the arrays out of the records, on both sides. Prints the medians and their
ratio (Flower / robustagg, so > 1 means robustagg is faster), and the largest difference between
the two new global models where both compute the same rule.

Conventions, mapped explicitly (f = Byzantine clients assumed):
  * FedTrimmedAvg(beta) cuts int(beta * n) values at each end: TrimmedMean(trim=int(beta * n)).
    (robustagg's own ``alpha`` rounds up, ceil(alpha * n), so the count is passed instead.)
  * FedMedian: the numpy median, as CoordinateMedian (even n: mean of the two middle values).
  * Krum(num_malicious_nodes=f): scores sum the n - f - 2 smallest squared distances, as Krum(f).
  * MultiKrum(num_malicious_nodes=f, num_nodes_to_select=m): MultiKrum(f, m); Flower weights the
    m selected by sample count, which equal counts make the plain mean robustagg takes.
  * Bulyan(num_malicious_nodes=f): Flower picks theta = n - 2f clients by one Multi-Krum ranking,
    robustagg by repeated Krum with rescoring (El Mhamdi et al.); both then average the
    beta = theta - 2f values closest to the median per coordinate. The selections may differ.
  * Flower aggregates the client models, robustagg their deltas from the global model and adds
    the result back; for these rules the two agree up to float32 rounding.

Usage: python benchmarks/flower_strategies.py [--model resnet18-cifar] [--n 20] [--f 4]
       [--repeats 3] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections import OrderedDict
from unittest.mock import Mock

import flwr
import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp import strategy as flower
from flwr.supercore.task_identity import TaskIdentity

from robustagg import aggregators as A
from robustagg.bench.models import model_layout
from robustagg.flower import RobustStrategy


def make_states(model: str, n: int, seed: int = 0):
    """The global model and n client models near it, as name -> float32 ndarray."""
    layout = model_layout(model)
    rng = np.random.default_rng(seed)
    base = OrderedDict((name, rng.standard_normal(shape, dtype=np.float32) * 0.05)
                       for name, shape in zip(layout.names, layout.shapes))
    clients = [OrderedDict((k, v + rng.standard_normal(v.shape, dtype=np.float32) * 0.01) for k, v in base.items())
               for _ in range(n)]
    return base, clients


def record(state) -> ArrayRecord:
    return ArrayRecord(OrderedDict((k, Array(v)) for k, v in state.items()))


def replies(clients) -> list[Message]:
    out = []
    for node_id, state in enumerate(clients, start=1):
        sent = Message(RecordDict({}), dst_node_id=node_id, message_type=MessageType.TRAIN)
        content = RecordDict({"arrays": record(state), "metrics": MetricRecord({"num-examples": 100})})
        out.append(Message(content, reply_to=sent))
    return out


def pairs(n: int, f: int):
    """(label, robustagg strategy, Flower strategy) for the same rule."""
    beta = 0.2
    trim = int(beta * n)
    m = n - f
    return [
        (f"trimmed mean (beta={beta}, trim={trim})", RobustStrategy(A.TrimmedMean(trim=trim)),
         flower.FedTrimmedAvg(beta=beta)),
        ("coordinate median", RobustStrategy(A.CoordinateMedian()), flower.FedMedian()),
        (f"Krum (f={f})", RobustStrategy(A.Krum(f=f)), flower.Krum(num_malicious_nodes=f)),
        (f"MultiKrum (f={f}, m={m})", RobustStrategy(A.MultiKrum(f=f, m=m)),
         flower.MultiKrum(num_malicious_nodes=f, num_nodes_to_select=m)),
        (f"Bulyan (f={f})", RobustStrategy(A.Bulyan(f=f)), flower.Bulyan(num_malicious_nodes=f)),
    ]


def timed(strategy, clients, repeats: int):
    """Median seconds of aggregate_train over fresh replies, and the last new global model."""
    times, arrays = [], None
    for _ in range(repeats):
        batch = replies(clients)
        start = time.perf_counter()
        arrays, _ = strategy.aggregate_train(1, batch)
        times.append(time.perf_counter() - start)
        del batch
    return statistics.median(times), arrays


def max_difference(a: ArrayRecord, b: ArrayRecord) -> float:
    return max(float(np.abs(a[k].numpy().astype(np.float64) - b[k].numpy()).max()) for k in a)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18-cifar")
    parser.add_argument("--n", type=int, default=20)
    parser.add_argument("--f", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    # Flower's runtime sets the process identity before app code runs; Messages read it.
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1

    base, clients = make_states(args.model, args.n)
    d = sum(v.size for v in base.values())
    grid = Mock(spec=Grid)
    grid.get_node_ids.return_value = list(range(1, args.n + 1))
    print(f"{args.model}: d={d:,}, n={args.n}, float32, {args.repeats} repeats (median); flwr {flwr.__version__}, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), {platform.processor() or platform.machine()}")
    rows = []
    header = f"{'rule':<34}{'robustagg s':>12}{'flwr s':>10}{'flwr/robustagg':>16}{'max |diff|':>12}"
    print(header)
    print("-" * len(header))
    for label, ours, theirs in pairs(args.n, args.f):
        ours.configure_train(1, record(base), ConfigRecord(), grid)
        t_ours, a_ours = timed(ours, clients, args.repeats)
        t_theirs, a_theirs = timed(theirs, clients, args.repeats)
        diff = max_difference(a_ours, a_theirs)
        rows.append({"rule": label, "robustagg_s": t_ours, "flwr_s": t_theirs, "ratio": t_theirs / t_ours,
                     "max_abs_diff": diff})
        print(f"{label:<34}{t_ours:>12.3f}{t_theirs:>10.3f}{t_theirs / t_ours:>15.1f}x{diff:>12.2e}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"model": args.model, "d": d, "n": args.n, "f": args.f, "repeats": args.repeats,
                       "flwr": flwr.__version__, "torch": torch.__version__, "threads": torch.get_num_threads(),
                       "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
