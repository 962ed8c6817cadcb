"""``python -m robustagg bench``: time every op (and aggregator) on every available backend next
to the torch reference, in one process, at real model sizes (see docs/backends.md)."""
from __future__ import annotations

import argparse
import csv
import json
import sys
from dataclasses import asdict, dataclass

import torch

from .. import _backend
from .._machine import commit, device_name
from .cases import Case, op_cases
from .models import EXPECTED_D, MODELS, model_layout
from .timing import Timer

DEFAULT_OPS = None  # every op case


@dataclass
class Row:
    section: str
    case: str
    n: int
    d: int
    backend: str
    ms: float
    speedup: float | None     # reference time / this time
    floor_ms: float           # bytes the op must move / bandwidth measured in this run
    x_floor: float            # ms / floor_ms (1.0 = at the floor)


def _backends(device, op):
    names = []
    for name in ("cpu", "cuda", "triton"):
        if name == "triton" and device.type != "cuda":
            continue  # the interpreter is a correctness tool, not a speed one
        if _backend._unavailable_reason(name, op, device) is None:
            names.append(name)
    return names


def _median_or_none(timer, thunk, what, skipped):
    """The median seconds of ``thunk``, or None (noted in ``skipped``) when the GPU runs out of
    memory: the float64 references copy G, which at ResNet-101 size and n = 100 is 36 GB."""
    try:
        return timer.median(thunk)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        skipped.append(f"{what}: out of memory")
        return None


def _run_case(section, case: Case, G, timer, skipped):
    """Rows for one case; the floor's bandwidth is measured right before it, so that a shared
    machine's changing load shifts the floor and the case together."""
    n, d = G.shape
    bandwidth, _, _ = timer.bandwidth(G)
    floor_s = case.bytes_moved / bandwidth
    timed = [("torch-ref", case.run("reference"))]
    timed += list((case.extra_baselines or {}).items())
    timed += [(b, case.run(b if b != "auto" else None)) for b in (_backends(G.device, case.op) if case.op else ["auto"])]
    rows, t_ref = [], None
    for name, thunk in timed:
        t = _median_or_none(timer, thunk, f"{section} {case.name} n={n} [{name}]", skipped)
        if t is None:
            continue
        t_ref = t if name == "torch-ref" else t_ref
        rows.append(Row(section, case.name, n, d, name, t * 1e3, t_ref / t if t_ref else None, floor_s * 1e3,
                        t / floor_s))
    return rows


def _aggregator_cases(G, layout):
    try:
        from .aggregators import make_aggregators
    except ImportError:
        return []
    n, d = G.shape
    root = G[: max(1, n // 10)].mean(0)
    auto = make_aggregators(n, layout, root, backend=None)
    torch_ref = make_aggregators(n, layout, root, backend="torch")
    cases = []
    for name in auto:
        def run(backend, name=name):
            agg = torch_ref[name] if backend == "reference" else auto[name]
            return lambda: agg(G)
        cases.append(Case(name, None, run, G.numel() * G.element_size()))
    return cases


def _table(rows, meta):
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"robustagg bench - {meta['model']} (d={meta['d']:,}), {meta['dtype']}, {meta['device']}\n"
                        f"floor: bytes moved / bandwidth of a {meta['floor']} timed before each case "
                        f"(first: {meta['bandwidth_GBps']:.1f} GB/s)")
    for col in ("section", "case", "n", "backend", "ms", "speedup vs torch", "floor ms", "x floor", "% of floor"):
        table.add_column(col, justify="left" if col in ("section", "case", "backend") else "right")
    for r in rows:
        table.add_row(r.section, r.case, str(r.n), r.backend, f"{r.ms:.1f}",
                      f"{r.speedup:.1f}x" if r.speedup is not None else "-", f"{r.floor_ms:.1f}",
                      f"{r.x_floor:.2f}", f"{100 / r.x_floor:.0f}%")
    Console(width=max(160, Console().width)).print(table)


def _plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fast = [r for r in rows if r.backend not in ("torch-ref",) and r.speedup is not None]
    labels = [f"{r.case} n={r.n} [{r.backend}]" for r in fast]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 0.32 * len(fast) + 1.5), sharey=True)
    ax1.barh(labels, [r.speedup for r in fast])
    ax1.set_xscale("log")
    ax1.set_xlabel("speedup over the torch reference")
    ax2.barh(labels, [100 / r.x_floor for r in fast])
    ax2.set_xlabel("% of the memory floor")
    ax1.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m robustagg bench", description=__doc__)
    parser.add_argument("--model", default="resnet18-cifar", choices=sorted(MODELS),
                        help="model preset giving d and the per-parameter layout")
    parser.add_argument("--n", type=int, nargs="+", default=[20, 100], help="client counts")
    parser.add_argument("--ops", nargs="*", default=None,
                        help="substrings selecting op cases (default: all); pass none to skip ops")
    parser.add_argument("--aggregators", action="store_true",
                        help="also time every aggregator (auto backend vs backend='torch')")
    parser.add_argument("--aggregator-n", type=int, default=50, help="client count for the aggregators")
    parser.add_argument("--dtype", default="float32", choices=["float16", "bfloat16", "float32", "float64"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats after warm-up (median)")
    parser.add_argument("--json", help="write results as JSON")
    parser.add_argument("--csv", help="write results as CSV")
    parser.add_argument("--plot", help="write a PNG of speedup and %% of floor")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from rich.progress import Progress

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    layout = model_layout(args.model)
    d = EXPECTED_D[args.model]
    timer = Timer(device, repeats=args.repeats)
    rows, meta, skipped = [], None, []
    plan = [(n, "ops") for n in args.n if args.ops is None or args.ops]
    if args.aggregators:
        plan.append((args.aggregator_n, "aggregators"))
    generator = torch.Generator(device="cpu").manual_seed(args.seed)
    with Progress(transient=True) as progress:
        task = progress.add_task("benchmarking", total=None)
        for n, section in plan:
            G = torch.randn(n, d, generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)
            bandwidth, _, floor_what = timer.bandwidth(G)
            meta = meta or {}
            cases = op_cases(G, layout) if section == "ops" else _aggregator_cases(G, layout)
            if section == "ops" and args.ops:
                cases = [c for c in cases if any(s in c.name for s in args.ops)]
            progress.update(task, total=(progress.tasks[0].total or 0) + len(cases))
            for case in cases:
                progress.update(task, description=f"{section}: {case.name} n={n}")
                rows.extend(_run_case(section, case, G, timer, skipped))
                progress.advance(task)
            meta.setdefault("bandwidth_GBps", bandwidth / 1e9)
            meta.setdefault("floor", floor_what)
            del G
    meta.update(model=args.model, d=d, dtype=args.dtype, device=device_name(device), torch=torch.__version__,
                triton=_triton_version(), commit=commit(), python=sys.version.split()[0],
                backends=_backend.available_backends(), skipped=skipped)
    _table(rows, meta)
    for line in skipped:
        print(f"skipped {line}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": [asdict(r) for r in rows]}, f, indent=1)
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(asdict(rows[0])) + ["device", "commit"])
            writer.writeheader()
            for r in rows:
                writer.writerow({**asdict(r), "device": meta["device"], "commit": meta["commit"]})
    if args.plot:
        _plot(rows, args.plot)
    return 0


def _triton_version():
    try:
        import triton
        return triton.__version__
    except ImportError:
        return None
