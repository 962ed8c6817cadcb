"""Tuning benchmark of the C++ CPU kernels of issue 3 against their targets, in one process.

    python benchmarks/tune_cpu_stats.py [--ops client_stats,topk,maxpool,pairwise] [--repeats 5]

fp32, d = 11,173,962 (ResNet-18 for CIFAR, robustagg.bench.models, from torch.nn), torch.set_num_threads(2),
medians after one warm-up call. Each row prints our time, the baseline's and the ratio the issue
targets:
  client_stats  n=20  <= 1.3x the G.sum(0) read floor
  topk_ef_step  k=1%  >= 3x faster than torch (momentum/error update, torch.topk, gather, zeroing)
  maxpool       n=20  >= 5x faster than a per-layer F.max_pool2d loop (per-parameter layout)
  pairwise      n=50  <= 1.5x a float32 G @ G.T
"""
import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import robustagg
from robustagg import ops
from robustagg.bench.models import model_layout


def median_ms(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def pair(name, ours, base, repeats, target):
    """Times ours and the baseline alternately (so machine load hits both alike)."""
    t_ours, t_base = [], []
    ours(), base()
    for _ in range(repeats):
        t_ours.append(median_ms(ours, 1))
        t_base.append(median_ms(base, 1))
    a, b = statistics.median(t_ours), statistics.median(t_base)
    print(f"{name:<14} ours {a:9.1f} ms   baseline {b:9.1f} ms   ours/baseline {a / b:5.2f}   ({target})", flush=True)
    return a, b


def maxpool_loop(G, layout, kernel):
    """The baseline: one F.max_pool2d per parameter, then a concatenation."""
    pieces = []
    for seg in layout.segments:
        x = G[:, seg.offset:seg.offset + seg.numel]
        if seg.pooled:
            x = F.max_pool2d(x.reshape(-1, 1, seg.rows, seg.cols), kernel).flatten(1)
        pieces.append(x)
    return torch.cat(pieces, dim=1)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--ops", default="client_stats,topk,maxpool,pairwise")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    layout = model_layout("resnet18-cifar")  # the real nn.Module's per-parameter layout
    d = layout.d
    assert d == 11_173_962, d
    wanted = args.ops.split(",")
    print(f"robustagg {robustagg.__version__}, torch {torch.__version__}, d={d}, threads={torch.get_num_threads()}")
    G50 = torch.randn(50, d) if "pairwise" in wanted else torch.randn(20, d)
    G = G50[:20]
    if "client_stats" in wanted:
        ref = torch.randn(d)
        window = (d // 3, d // 10)
        pair("client_stats", lambda: ops.client_stats(G, window, ref, backend="cpu"), lambda: G.sum(0),
             args.repeats, "target <= 1.3")
    if "topk" in wanted:
        k, rho = d // 100, 0.9
        u = torch.randn(d)
        state = [torch.zeros(d), torch.zeros(d)]
        state_ref = [torch.zeros(d), torch.zeros(d)]

        def torch_step():
            e, m = state_ref
            m.mul_(rho).add_(u)
            e.add_(m)
            idx = torch.topk(e.abs(), k, sorted=False).indices
            values = e[idx]
            e[idx] = 0
            m[idx] = 0
            return idx, values

        pair("topk_ef_step", lambda: ops.topk_ef_step(u, state[0], state[1], k, rho, backend="cpu"), torch_step,
             args.repeats, "target <= 0.33")
    if "maxpool" in wanted:
        assert torch.equal(ops.maxpool_amplify(G, layout, 2, backend="cpu"), maxpool_loop(G, layout, 2))
        pair("maxpool", lambda: ops.maxpool_amplify(G, layout, 2, backend="cpu"), lambda: maxpool_loop(G, layout, 2),
             args.repeats, "target <= 0.2")
    if "pairwise" in wanted:
        pair("pairwise", lambda: ops.pairwise_sqdist(G50, backend="cpu"), lambda: G50 @ G50.T, max(3, args.repeats // 2),
             "target <= 1.5")


if __name__ == "__main__":
    main()
