"""Timing of the CPU sign-vote and order-statistic kernels against the torch reference and the
read floor (G.sum(0)), medians after warm-up, all in one process. Used while tuning; the full
benchmark is `python -m robustagg bench`.

    python benchmarks/tune_order_stats.py --n 20 --d 11173962 [--ops median,trimmed_mean] [--no-ref]
"""
import argparse
import statistics
import time

import torch

import robustagg
from robustagg import reference


def median_time(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=20)
    parser.add_argument("--d", type=int, default=11_173_962)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--ref-repeats", type=int, default=1)
    parser.add_argument("--ops", default="sign_sum,rlr,trimmed_mean,median,invariant")
    parser.add_argument("--no-ref", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    n, d = args.n, args.d
    G = torch.randn(n, d)
    trim = 5 if n > 10 else 1
    ops = {
        "sign_sum": (lambda: robustagg.sign_sum(G), lambda: reference.sign_sum(G)),
        "rlr": (lambda: robustagg.rlr(G, n // 2), lambda: reference.rlr(G, n // 2)),
        "trimmed_mean": (lambda: robustagg.trimmed_mean(G, trim), lambda: reference.trimmed_mean(G, trim)),
        "median": (lambda: robustagg.median(G), lambda: reference.median(G)),
        "invariant": (lambda: robustagg.invariant(G, 0.6, trim), lambda: reference.invariant(G, 0.6, trim)),
    }
    names = args.ops.split(",")
    # The machine is shared: time the floor and every op in each round, so that the ratios of one
    # round see the same load, and report medians over rounds.
    rounds = {name: [] for name in ["floor"] + names}
    fns = {"floor": lambda: G.sum(0), **{name: ops[name][0] for name in names}}
    for fn in fns.values():
        fn()
    for _ in range(args.repeats):
        for name, fn in fns.items():
            rounds[name].append(median_time(fn, 1))
    floor = statistics.median(rounds["floor"])
    print(f"n={n} d={d} fp32, floor G.sum(0) = {floor * 1e3:.1f} ms")
    for name in names:
        fast, ref = ops[name]
        t = statistics.median(rounds[name])
        ratio = statistics.median(a / b for a, b in zip(rounds[name], rounds["floor"]))
        line = f"{name:14s} cpu {t * 1e3:8.1f} ms  {ratio:5.2f}x floor"
        if not args.no_ref:
            r = median_time(ref, args.ref_repeats)
            line += f"   torch {r * 1e3:9.1f} ms  speedup {r / t:6.1f}x"
        print(line, flush=True)


if __name__ == "__main__":
    main()
