"""Times every op on the CUDA C++ backend, the Triton backend and the torch reference, on one GPU.

    python benchmarks/bench_cuda.py [--presets resnet18-cifar resnet101] [--ns 20 50 100] [--repeats 7]

Method (SPEC §8): CUDA events around each call, the L2 flushed before every repeat by writing a
256 MB buffer, medians over the repeats after warm-up. The memory floor of a row is the bytes the
op must move divided by the device-to-device copy bandwidth measured in the same run. Results go
to benchmarks/results/<gpu>-cuda.json with the device name and versions. Needs a CUDA device and
the CUDA build of robustagg; importing this file does nothing.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FLUSH_BYTES = 256 << 20
BACKENDS = ("cuda", "triton", "torch")
OPS = ("sign_sum", "median", "trimmed_mean", "invariant", "rlr", "client_stats", "clip_rows", "topk_ef_step",
       "topk_abs", "maxpool_amplify", "pairwise_sqdist", "pairwise_cosine")


# ---------------------------------------------------------------- model sizes

def resnet18_cifar_shapes():
    """Parameter shapes of the CIFAR ResNet-18 (BasicBlock [2, 2, 2, 2], 10 classes): 11,173,962 values."""
    shapes = [(64, 3, 3, 3), (64,), (64,)]
    in_planes = 64
    for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        for block_stride in (stride, 1):
            shapes += [(planes, in_planes, 3, 3), (planes,), (planes,), (planes, planes, 3, 3), (planes,), (planes,)]
            if block_stride != 1 or in_planes != planes:
                shapes += [(planes, in_planes, 1, 1), (planes,), (planes,)]
            in_planes = planes
    shapes += [(10, 512), (10,)]
    return shapes


def presets():
    r18 = resnet18_cifar_shapes()
    d18 = sum(math.prod(s) for s in r18)
    assert d18 == 11_173_962, d18
    # ResNet-101 (torchvision, 1000 classes) has 44,549,160 parameters; its max-pool layout here is
    # the authors' flat form (rows of 1000 values), since only its size matters for timing.
    return {"resnet18-cifar": (d18, r18), "resnet101": (44_549_160, None)}


# ---------------------------------------------------------------- timing

class Timer:
    """Median of CUDA-event times with the L2 flushed before each repeat.

    Calls slower than ``slow_ms`` (the torch reference at ResNet-101 size) get ``slow_repeats``
    repeats, so one row cannot take minutes.
    """

    def __init__(self, torch, warmup: int, repeats: int, slow_ms: float = 500.0, slow_repeats: int = 3):
        self.torch, self.warmup, self.repeats = torch, warmup, repeats
        self.slow_ms, self.slow_repeats = slow_ms, slow_repeats
        self.flush = torch.empty(FLUSH_BYTES, dtype=torch.uint8, device="cuda")

    def once(self, fn) -> float:
        torch = self.torch
        self.flush.fill_(1)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)

    def __call__(self, fn) -> float:
        first = self.once(fn)
        for _ in range(self.warmup - 1):
            self.once(fn)
        repeats = self.slow_repeats if first > self.slow_ms else self.repeats
        return statistics.median(self.once(fn) for _ in range(repeats))


def copy_bandwidth(torch, timer: Timer) -> float:
    """Device-to-device copy bandwidth in bytes/ms (read + write of a 1 GiB buffer)."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src))
    del src, dst
    return 2 * (1 << 30) / ms


# ---------------------------------------------------------------- the ops

def make_calls(torch, ops, layout_cls, G, n, d, shapes):
    """{op: (call(backend), bytes the op must move)} for G (n, d) float32 on the GPU."""
    es = G.element_size()
    trim = max(0, min((n - 1) // 2, math.ceil(0.1 * n)))
    u = G[0].clone()
    err, mom = torch.zeros_like(u), torch.zeros_like(u)
    ref = G[1].clone()
    layout = layout_cls.from_shapes(shapes) if shapes is not None else layout_cls.flat(1000)
    d_amp = layout.pooled_width(d, 2)
    kw = {"nonfinite": "propagate"}
    return {
        "sign_sum": (lambda b: ops.sign_sum(G, backend=b, **kw), n * d * es + 4 * d),
        "median": (lambda b: ops.median(G, backend=b, **kw), (n + 1) * d * es),
        "trimmed_mean": (lambda b: ops.trimmed_mean(G, trim, backend=b, **kw), (n + 1) * d * es),
        "invariant": (lambda b: ops.invariant(G, 0.6, math.ceil(0.25 * n) if 2 * math.ceil(0.25 * n) < n else 0,
                                              backend=b, **kw), (n + 1) * d * es + d),
        "rlr": (lambda b: ops.rlr(G, n // 2, backend=b, **kw), (n + 1) * d * es),
        "client_stats": (lambda b: ops.client_stats(G, (d // 3, d // 10), ref, backend=b, **kw), (n + 1) * d * es),
        "clip_rows": (lambda b: ops.clip_rows(G, 1.0, backend=b, **kw), 2 * n * d * es),
        "topk_ef_step": (lambda b: ops.topk_ef_step(u, err, mom, d // 100, 0.9, backend=b, **kw), 5 * d * es),
        "topk_abs": (lambda b: ops.topk_abs(u, d // 100, backend=b, **kw), d * es),
        "maxpool_amplify": (lambda b: ops.maxpool_amplify(G, layout, 2, backend=b, **kw), n * (d + d_amp) * es),
        "pairwise_sqdist": (lambda b: ops.pairwise_sqdist(G, backend=b, **kw), n * d * es),
        "pairwise_cosine": (lambda b: ops.pairwise_cosine(G, backend=b, **kw), n * d * es),
    }


def per_layer_maxpool(torch, G, shapes):
    """The per-layer loop max-pooling replaces (AGRAmplifier's code): one F.max_pool2d per weight."""
    F = torch.nn.functional
    pieces, offset = [], 0
    for s in shapes:
        numel = math.prod(s)
        x = G[:, offset:offset + numel]
        offset += numel
        if len(s) < 2:
            pieces.append(x)
            continue
        rows, cols = s[0], numel // s[0]
        if rows >= 2 and cols >= 2:
            pieces.append(F.max_pool2d(x.reshape(-1, 1, rows, cols), 2, 2).reshape(G.shape[0], -1))
    return torch.cat(pieces, dim=1)


# ---------------------------------------------------------------- main

def versions(torch):
    info = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                        text=True).stdout.strip()
    except OSError:
        info["commit"] = None
    return info


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["resnet18-cifar", "resnet101"])
    parser.add_argument("--ns", nargs="+", type=int, default=[20, 50, 100])
    parser.add_argument("--ops", nargs="+", default=list(OPS), choices=OPS)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    import torch
    if not torch.cuda.is_available():
        raise SystemExit("bench_cuda.py needs a CUDA device; torch sees none")
    import robustagg
    from robustagg import _backend, ops
    from robustagg.layout import Layout

    available = robustagg.available_backends()
    timer = Timer(torch, args.warmup, args.repeats)
    bandwidth = copy_bandwidth(torch, timer)
    print(f"{torch.cuda.get_device_name()}: device-to-device copy {bandwidth / 1e6:.0f} GB/s")
    rows = []
    table = presets()
    for preset in args.presets:
        d, shapes = table[preset]
        for n in args.ns:
            G = torch.randn(n, d, device="cuda")
            calls = make_calls(torch, ops, Layout, G, n, d, shapes)
            for op in args.ops:
                call, nbytes = calls[op]
                floor_ms = nbytes / bandwidth
                times = {}
                for backend in BACKENDS:
                    raw = op if op not in ("median", "trimmed_mean") else "order_mean"
                    reason = available[backend] if available[backend] != "available" else \
                        _backend._unavailable_reason(backend, raw, G.device)
                    if reason is not None:
                        rows.append(dict(preset=preset, d=d, n=n, op=op, backend=backend, unavailable=reason))
                        continue
                    try:
                        times[backend] = timer(lambda: call(backend))
                    except torch.cuda.OutOfMemoryError:
                        torch.cuda.empty_cache()
                        rows.append(dict(preset=preset, d=d, n=n, op=op, backend=backend, error="out of memory"))
                        print(f"{preset:15s} n={n:4d} {op:16s} {backend:7s} out of memory")
                for backend, ms in times.items():
                    row = dict(preset=preset, d=d, n=n, op=op, backend=backend, median_ms=ms, floor_ms=floor_ms,
                               fraction_of_floor=floor_ms / ms,
                               speedup_vs_torch=times["torch"] / ms if "torch" in times else None)
                    rows.append(row)
                    speed = f"{row['speedup_vs_torch']:7.1f}x" if row["speedup_vs_torch"] else "       -"
                    print(f"{preset:15s} n={n:4d} {op:16s} {backend:7s} {ms:9.3f} ms {speed}  "
                          f"{100 * row['fraction_of_floor']:5.1f}% of floor")
                if op == "maxpool_amplify" and shapes is not None and "cuda" in times:
                    loop_ms = timer(lambda: per_layer_maxpool(torch, G, shapes))
                    rows.append(dict(preset=preset, d=d, n=n, op="maxpool_per_layer_loop", backend="torch",
                                     median_ms=loop_ms, cuda_speedup=loop_ms / times["cuda"]))
                    print(f"{preset:15s} n={n:4d} per-layer loop   torch   {loop_ms:9.3f} ms "
                          f"(cuda {loop_ms / times['cuda']:.1f}x faster)")
            del G, calls
            torch.cuda.empty_cache()
    info = versions(torch)
    gpu = re.sub(r"[^a-z0-9]+", "-", info["device"].lower()).strip("-")
    out = args.out or ROOT / "benchmarks" / "results" / f"{gpu}-cuda.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**info, "copy_bandwidth_GBps": bandwidth / 1e6, "repeats": args.repeats,
                               "l2_flush_bytes": FLUSH_BYTES, "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
