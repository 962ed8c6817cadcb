"""Time every Triton op against the torch reference on a CUDA GPU (issue 4's targets).

    python benchmarks/bench_triton.py [--repeats 10] [--out benchmarks/results]

Shapes: d = 11,173,962 (resnet18-cifar) and d = 44,549,160 (ResNet-101), n in {20, 50, 100},
float32. Method: CUDA events around each call, the L2 cache flushed before every repeat by writing
a 256 MB buffer, medians over the repeats after warm-up. The memory floor of a row is the bytes the
op must move divided by the device-to-device copy bandwidth measured in the same run.
Ops run with nonfinite="propagate", so the times are the kernels' (the policy check is the same
small extra step on every backend). Writes benchmarks/results/<gpu>-triton.json.
Needs a CUDA device; on a machine without one it says so and exits.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys

import torch

D_RESNET18_CIFAR = 11_173_962
D_RESNET101 = 44_549_160
CLIENTS = (20, 50, 100)
FLUSH_BYTES = 256 * 1024 * 1024


def resnet18_cifar_shapes():
    """Parameter shapes of the CIFAR ResNet-18 (BasicBlock, [2, 2, 2, 2], 10 classes): d = 11,173,962."""
    shapes = [(64, 3, 3, 3), (64,), (64,)]
    in_planes = 64
    for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        for block in range(2):
            s = stride if block == 0 else 1
            shapes += [(planes, in_planes, 3, 3), (planes,), (planes,), (planes, planes, 3, 3), (planes,), (planes,)]
            if s != 1 or in_planes != planes:
                shapes += [(planes, in_planes, 1, 1), (planes,), (planes,)]
            in_planes = planes
    return shapes + [(10, 512), (10,)]


class Timer:
    """Median CUDA-event time of a call, with the L2 flushed before each repeat."""

    def __init__(self, repeats: int, warmup: int = 2):
        self.repeats, self.warmup = repeats, warmup
        self.flush = torch.empty(FLUSH_BYTES // 4, dtype=torch.float32, device="cuda")

    def __call__(self, fn) -> float:
        for _ in range(self.warmup):
            fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(self.repeats):
            self.flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
            if times[0] > 2000 and len(times) >= 3:  # a slow reference: three repeats are enough
                break
        return statistics.median(times)


def copy_bandwidth(timer: Timer) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write of a 1 GiB buffer)."""
    src = torch.empty(1 << 28, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src))
    return 2 * src.numel() * 4 / (ms * 1e-3)


def _cases(n, d, G, layout):
    """(op name, triton call, torch call, bytes the op must move, target) for one shape."""
    import robustagg as ra
    kw = dict(nonfinite="propagate")
    s = G.element_size()
    read = n * d * s
    trim = n // 4
    cases = [
        ("sign_sum", lambda b: ra.sign_sum(G, backend=b, **kw), read + 4 * d, "80% of copy bw"),
        ("trimmed_mean", lambda b: ra.trimmed_mean(G, trim, backend=b, **kw), read + d * s, "20x torch"),
        ("median", lambda b: ra.median(G, backend=b, **kw), read + d * s, "20x torch"),
        ("invariant", lambda b: ra.invariant(G, 0.6, trim, backend=b, **kw), read + d * s, "80% of copy bw"),
        ("rlr", lambda b: ra.rlr(G, n // 2, backend=b, **kw), read + d * s, "80% of copy bw"),
        ("client_stats", lambda b: ra.client_stats(G, (0, d // 10), G[0], backend=b, **kw), read + d * s,
         "80% of copy bw"),
        ("clip_rows", lambda b: ra.clip_rows(G, 1.0, backend=b, **kw), 2 * read, ""),
        ("pairwise_sqdist", lambda b: ra.pairwise_sqdist(G, backend=b, **kw), read, ""),
        ("pairwise_cosine", lambda b: ra.pairwise_cosine(G, backend=b, **kw), read, ""),
    ]
    if layout is not None:
        cases.append(("maxpool_amplify", lambda b: ra.maxpool_amplify(G, layout, 2, backend=b, **kw),
                      read + read // 4, "10x per-layer loop"))
    return cases


def _vector_cases(d):
    import robustagg as ra
    g = torch.Generator(device="cuda").manual_seed(0)
    u = torch.randn(d, device="cuda", generator=g)
    k = d // 100
    state = {b: (torch.zeros(d, device="cuda"), torch.zeros(d, device="cuda")) for b in ("triton", "torch")}
    return [
        ("topk_ef_step", lambda b: ra.topk_ef_step(u, *state[b], k, 0.9, backend=b, nonfinite="propagate"),
         5 * d * 4, "3x torch"),
        ("topk_abs", lambda b: ra.topk_abs(u, k, backend=b, nonfinite="propagate"), d * 4, ""),
    ]


def _time_or_none(timer, fn):
    """The median time, or None where the call runs out of memory (the float64 references copy G)."""
    try:
        return timer(fn)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None


def _row(timer, bandwidth, name, n, d, fn, floor_bytes, target):
    triton_ms = _time_or_none(timer, lambda: fn("triton"))
    torch_ms = _time_or_none(timer, lambda: fn("torch"))
    floor_ms = floor_bytes / bandwidth * 1e3
    both = triton_ms is not None and torch_ms is not None
    row = dict(op=name, n=n, d=d, triton_ms=triton_ms, torch_ms=torch_ms,
               speedup=torch_ms / triton_ms if both else None, floor_ms=floor_ms,
               fraction_of_floor=floor_ms / triton_ms if triton_ms is not None else None, target=target)

    def show(ms, width):
        return f"{ms:{width}.3f} ms" if ms is not None else f"{'OOM':>{width + 3}}"

    speedup = f"x{row['speedup']:7.1f}" if both else " " * 8
    fraction = f"({100 * row['fraction_of_floor']:5.1f}%)" if triton_ms is not None else ""
    print(f"{name:16s} n={n!s:>4} d={d:>11,} triton {show(triton_ms, 9)}  torch {show(torch_ms, 10)}  "
          f"{speedup}  floor {floor_ms:7.3f} ms {fraction}", flush=True)
    return row


def _commit():
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_triton: no CUDA device; the Triton benchmark needs a GPU", file=sys.stderr)
        return 1
    import triton
    import robustagg
    from robustagg.layout import Layout

    timer = Timer(args.repeats)
    bandwidth = copy_bandwidth(timer)
    print(f"{torch.cuda.get_device_name()}: device-to-device copy {bandwidth / 1e9:.0f} GB/s", flush=True)
    rows = []
    layout18 = Layout.from_shapes(resnet18_cifar_shapes())
    assert layout18.d == D_RESNET18_CIFAR, layout18.d
    for d in (D_RESNET18_CIFAR, D_RESNET101):
        for name, fn, floor_bytes, target in _vector_cases(d):
            rows.append(_row(timer, bandwidth, name, None, d, fn, floor_bytes, target))
        for n in CLIENTS:
            G = torch.randn(n, d, device="cuda", generator=torch.Generator(device="cuda").manual_seed(n))
            layout = layout18 if d == D_RESNET18_CIFAR else None
            for name, fn, floor_bytes, target in _cases(n, d, G, layout):
                rows.append(_row(timer, bandwidth, name, n, d, fn, floor_bytes, target))
            del G
            torch.cuda.empty_cache()
    device = torch.cuda.get_device_name()
    result = dict(device=device, torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda,
                  robustagg=robustagg.__version__, commit=_commit(), python=platform.python_version(),
                  copy_bandwidth_gbs=bandwidth / 1e9, dtype="float32", repeats=args.repeats,
                  method="CUDA events, L2 flushed (256 MB write) before each repeat, median", rows=rows)
    os.makedirs(args.out, exist_ok=True)
    slug = "".join(c if c.isalnum() else "-" for c in device.lower()).strip("-")
    path = os.path.join(args.out, f"{slug}-triton.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
