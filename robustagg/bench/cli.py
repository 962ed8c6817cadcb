"""``python -m robustagg bench``: time every op (and aggregator, and the peer libraries' versions of
the same rules) on every available backend next to the torch reference, in one process, at real
model sizes (see docs/backends.md, "Benchmark").

The default run, what ``make bench`` does, times every op against its reference at n = 20 and
fits in a few minutes on a 2-core machine; ``--full`` runs the whole matrix.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from dataclasses import asdict, dataclass

import torch

from .. import _backend
from .._machine import commit, device_name
from ..layout import Layout
from .cases import Case, op_cases
from .models import EXPECTED_D, MODELS, model_layout
from .timing import Floor, Timer, Timing, format_seconds

FULL_N = [20, 50, 100]


@dataclass
class Row:
    section: str
    case: str
    n: int
    d: int
    backend: str
    ms: float                 # median of the timed calls
    ms_min: float
    ms_max: float
    calls: int                # timed calls; 1 when one call was slower than the time budget
    # ops, aggregators: the torch reference's time / this time. peers: this implementation's time /
    # robustagg's, i.e. how many times faster robustagg is (None on robustagg's own row).
    speedup: float | None
    floor_ms: float           # the least time to move the op's bytes at the floor measured before the case
    x_floor: float            # ms / floor_ms (1.0 = at the floor)
    x_fedavg: float | None    # aggregators: this time / FedAvg's time on the same backend
    noisy: str                # why this row is not a clean measurement ("" when it is)


def _backends(device, op):
    names = []
    for name in ("cpu", "cuda", "triton"):
        if name == "triton" and device.type != "cuda":
            continue  # the interpreter is a correctness tool, not a speed one
        if _backend._unavailable_reason(name, op, device) is None:
            names.append(name)
    return names


def _measure_or_none(timer, thunk, what, skipped) -> Timing | None:
    """The timing of ``thunk``, or None (noted in ``skipped``) when it runs out of memory: the
    float64 references copy G, which at ResNet-101 size and n = 100 is 36 GB of GPU memory, and
    ByzFL's NNM gathers an (n, n - f, d) tensor, 89 GB at ResNet-18 size and n = 50."""
    try:
        return timer.measure(thunk)
    except (MemoryError, RuntimeError) as error:
        # torch.OutOfMemoryError on a GPU; torch's host allocator raises a plain RuntimeError
        if not isinstance(error, (MemoryError, torch.OutOfMemoryError)) and "can't allocate memory" not in str(error):
            raise
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        skipped.append(f"{what}: out of memory")
        return None


def _noise(timing: Timing, floor: Floor, x_floor: float) -> str:
    reasons = []
    if not floor.plausible:
        reasons.append("floor below 20% of the run's best bandwidth")
    if x_floor < 1:
        reasons.append("faster than the floor")
    if timing.noisy:
        reasons.append("calls spread over more than 1.5x")
    return "; ".join(reasons)


def _row(section, case, n, d, name, timing, speedup, floor, floor_s) -> Row:
    x_floor = timing.median / floor_s
    return Row(section, case.name, n, d, name, timing.median * 1e3, timing.min * 1e3, timing.max * 1e3, timing.calls,
               speedup, floor_s * 1e3, x_floor, None, _noise(timing, floor, x_floor))


def _run_case(section, case: Case, G, timer, skipped):
    """Rows for one case; the floor is measured right before it, so that a shared machine's
    changing load shifts the floor and the case together."""
    n, d = G.shape
    floor = timer.floor(G, writes=case.fresh_bytes > 0)
    floor_s = floor.seconds(case.bytes_read, case.fresh_bytes)
    timed = [("torch-ref", case.run("reference"))]
    timed += list((case.extra_baselines or {}).items())
    timed += [(b, case.run(b if b != "auto" else None)) for b in (_backends(G.device, case.op) if case.op else ["auto"])]
    rows, t_ref = [], None
    for name, thunk in timed:
        timing = _measure_or_none(timer, thunk, f"{section} {case.name} n={n} [{name}]", skipped)
        if timing is None:
            continue
        t_ref = timing.median if name == "torch-ref" else t_ref
        rows.append(_row(section, case, n, d, name, timing, t_ref / timing.median if t_ref else None, floor, floor_s))
    return rows


def _run_peer_rule(rule, G, timer, skipped):
    """Rows for one rule of the peers section: robustagg's implementation, then each peer's."""
    n, d = G.shape
    floor = timer.floor(G)
    floor_s = floor.seconds(rule.bytes_read)
    rows, ours = [], None
    for name, thunk in [("robustagg", rule.robustagg), *rule.peers.items()]:
        timing = _measure_or_none(timer, thunk, f"peers {rule.name} n={n} [{name}]", skipped)
        if timing is None:
            continue
        ours = timing.median if name == "robustagg" else ours
        speedup = timing.median / ours if ours and name != "robustagg" else None
        rows.append(_row("peers", rule, n, d, name, timing, speedup, floor, floor_s))
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


def _peer_rules(G):
    from .peers import peer_rules
    return peer_rules(G, f=G.shape[0] // 5)


def _section_items(section, G, layout, ops_filter, rules_filter=None):
    """What a section times on G: Cases (ops, aggregators) or PeerRules (peers), those whose name
    holds one of the section's filter substrings (every one without a filter)."""
    if section == "ops":
        items, chosen = op_cases(G, layout), ops_filter
    else:
        items = _aggregator_cases(G, layout) if section == "aggregators" else _peer_rules(G)
        chosen = rules_filter
    return [item for item in items if any(s in item.name for s in chosen)] if chosen else items


def _item_count(section, n, d, dtype, layout, ops_filter, rules_filter=None):
    """How many cases a section will time, from a stand-in G of the same shape and dtype that holds
    one row of memory: the count does not depend on G's values, and the real G of each section is
    only built when its turn comes."""
    stand_in = torch.zeros(1, d, dtype=dtype).expand(n, d)
    return len(_section_items(section, stand_in, layout, ops_filter, rules_filter))


def _add_x_fedavg(rows):
    fedavg = {(r.n, r.backend): r.ms for r in rows if r.section == "aggregators" and r.case == "FedAvg"}
    for r in rows:
        if r.section == "aggregators" and (r.n, r.backend) in fedavg:
            r.x_fedavg = r.ms / fedavg[(r.n, r.backend)]


def _ms(value_ms: float) -> str:
    return format_seconds(value_ms / 1e3)


def _table(rows, meta, sections):
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(170, Console().width))
    title = (f"robustagg bench - {meta['model']} (d={meta['d']:,}), {meta['dtype']}, {meta['device']}, "
             f"commit {meta['commit']}\nfloor: the fastest plain read of G ({', '.join(meta['floor_passes'])}), "
             f"timed before each case; best {meta['best_bandwidth_GBps']:.1f} GB/s")
    for section in sections:
        part = [r for r in rows if r.section == section]
        if not part:
            continue
        peers = section == "peers"
        table = Table(title=f"{title}\n{section}" if section == sections[0] else section)
        columns = ["case", "n", "backend", "median", "min - max", "calls",
                   "robustagg faster" if peers else "speedup vs torch", "floor", "% of floor"]
        if section == "aggregators":
            columns.append("x FedAvg")
        columns.append("noisy")
        for col in columns:
            table.add_column(col, justify="left" if col in ("case", "backend", "noisy") else "right")
        for r in part:
            cells = [r.case, str(r.n), r.backend, _ms(r.ms), f"{_ms(r.ms_min)} - {_ms(r.ms_max)}", str(r.calls),
                     f"{r.speedup:.1f}x" if r.speedup is not None else "-", _ms(r.floor_ms),
                     "-" if r.noisy else f"{100 / r.x_floor:.0f}%"]
            if section == "aggregators":
                cells.append(f"{r.x_fedavg:.2f}" if r.x_fedavg is not None else "-")
            table.add_row(*cells, r.noisy)
        console.print(table)
    console.print(f"calls: timed calls after a warm-up, within {meta['budget_s']:g} s per implementation; a call "
                  "slower than that is timed once. '% of floor' is left out on noisy rows.")


def _plot(rows, meta, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fast = [r for r in rows if r.section != "peers" and r.backend != "torch-ref" and r.speedup is not None]
    labels = [f"{r.case} n={r.n} [{r.backend}]" for r in fast]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 0.32 * len(fast) + 2), sharey=True)
    ax1.barh(labels, [r.speedup for r in fast])
    ax1.set_xscale("log")   # one outlier cannot squash the others on a log axis
    ax1.axvline(1.0, color="black", linewidth=0.8)
    ax1.set_xlabel("speedup over the torch reference (log)")
    percent = [0.0 if r.noisy else 100 / r.x_floor for r in fast]
    ax2.barh(labels, percent, color=["lightgray" if r.noisy else "tab:green" for r in fast])
    ax2.axvline(100.0, color="black", linestyle="--", linewidth=1, label="the floor (100%)")
    ax2.set_xlim(0, 105)
    ax2.set_xlabel("% of the memory floor (gray, empty: noisy row)")
    ax2.legend(loc="lower right")
    ax1.invert_yaxis()
    ns = sorted({r.n for r in fast})
    fig.suptitle(f"robustagg bench: {meta['device']}, commit {meta['commit']}, {meta['dtype']}, "
                 f"{meta['model']} (d={meta['d']:,}), n = {', '.join(map(str, ns))}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _shapes(text: str) -> list[tuple[int, ...]]:
    """'64x3x3x3,64,10x512' -> [(64, 3, 3, 3), (64,), (10, 512)]."""
    try:
        shapes = [tuple(int(s) for s in part.split("x")) for part in text.split(",")]
    except ValueError:
        shapes = []
    if not shapes or any(not s or min(s) < 1 for s in shapes):
        raise argparse.ArgumentTypeError(f"--shapes {text!r}: give parameter shapes like 64x3x3x3,64,10x512 "
                                         "(positive sizes, 'x' between dimensions, ',' between parameters)")
    return shapes


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def _seconds(text: str) -> float:
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{value} must be a finite number of seconds > 0")
    return value


def _parser():
    parser = argparse.ArgumentParser(prog="python -m robustagg bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    shape = parser.add_mutually_exclusive_group()
    shape.add_argument("--model", default=None, choices=sorted(MODELS),
                       help="model preset giving d and the per-parameter layout (default: resnet18-cifar)")
    shape.add_argument("--d", type=_positive, help="a custom model: one flat parameter of d values")
    shape.add_argument("--shapes", type=_shapes, help="a custom model: its parameter shapes, e.g. 64x3x3x3,64,10x512")
    parser.add_argument("--n", type=_positive, nargs="+", default=None,
                        help="client counts of the op section (default: 20; --full: 20 50 100)")
    parser.add_argument("--ops", nargs="*", default=None,
                        help="substrings selecting op cases (default: all); --ops with no value skips the ops")
    parser.add_argument("--aggregators", action="store_true",
                        help="also time every aggregator (auto backend vs backend='torch'), with 'x FedAvg'")
    parser.add_argument("--aggregator-n", type=_positive, default=50, help="client count for the aggregators")
    parser.add_argument("--peers", action="store_true",
                        help="also time the peer libraries' versions of the same rules (ByzFL, Flower, numpy, "
                             "torch), where installed")
    parser.add_argument("--peer-n", type=_positive, default=20, help="client count for the peers section")
    parser.add_argument("--rules", nargs="+", default=None,
                        help="substrings selecting the aggregators and the peers' rules by name (default: all)")
    parser.add_argument("--full", action="store_true",
                        help="the whole matrix: ops at n = 20 50 100, the aggregators and the peers")
    parser.add_argument("--dtype", default="float32", choices=["float16", "bfloat16", "float32", "float64"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=_positive, help="CPU threads for torch and for robustagg's kernels")
    parser.add_argument("--repeats", type=_positive, default=5, help="timed calls after warm-up, at most")
    parser.add_argument("--budget", type=_seconds, default=None,
                        help="seconds of timed calls per implementation (default 2; --full: 12); slower calls "
                             "are timed once")
    parser.add_argument("--json", help="write results as JSON")
    parser.add_argument("--csv", help="write results as CSV")
    parser.add_argument("--plot", help="write a PNG of speedup and %% of floor")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def _model(args) -> tuple[str, int, Layout]:
    if args.d is not None:
        return f"custom (one parameter of {args.d:,})", args.d, Layout.from_shapes([(args.d,)])
    if args.shapes is not None:
        layout = Layout.from_shapes(args.shapes)
        return f"custom ({len(args.shapes)} parameters)", layout.d, layout
    name = args.model or "resnet18-cifar"
    return name, EXPECTED_D[name], model_layout(name)


def _set_threads(threads: int) -> None:
    # robustagg._C loads the OpenMP runtime torch already loaded (the same soname), so this one
    # call sets the threads of torch and of the C++ kernels alike.
    torch.set_num_threads(threads)


def main(argv=None):
    args = _parser().parse_args(argv)
    if args.threads is not None:
        _set_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    model, d, layout = _model(args)
    ns = args.n or (FULL_N if args.full else [20])
    budget = args.budget if args.budget is not None else (12.0 if args.full else 2.0)
    plan = [("ops", n) for n in ns] if args.ops != [] else []
    if args.aggregators or args.full:
        plan.append(("aggregators", args.aggregator_n))
    if args.peers or args.full:
        plan.append(("peers", args.peer_n))
    if not plan:
        print("python -m robustagg bench: nothing to time: --ops with no value skips the ops; add --aggregators "
              "or --peers", file=sys.stderr)
        return 2

    from rich.progress import Progress

    timer = Timer(device, repeats=args.repeats, budget_s=budget)
    rows, skipped = [], []
    generator = torch.Generator(device="cpu").manual_seed(args.seed)
    with Progress(transient=True) as progress:
        total = sum(_item_count(section, n, d, dtype, layout, args.ops, args.rules) for section, n in plan)
        task = progress.add_task("benchmarking", total=total)
        for section, n in plan:
            G = torch.randn(n, d, generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)
            for item in _section_items(section, G, layout, args.ops, args.rules):
                progress.update(task, description=f"{section}: {item.name} n={n}")
                run = _run_peer_rule if section == "peers" else lambda *a: _run_case(section, *a)
                rows.extend(run(item, G, timer, skipped))
                progress.advance(task)
            del G
    _add_x_fedavg(rows)
    meta = dict(model=model, d=d, dtype=args.dtype, device=device_name(device), torch=torch.__version__,
                triton=_version("triton"), commit=commit(), python=sys.version.split()[0],
                backends=_backend.available_backends(), floor_passes=sorted(timer.floor_passes),
                best_bandwidth_GBps=timer.best_bandwidth / 1e9, budget_s=budget, repeats=args.repeats,
                skipped=skipped)
    if any(section == "peers" for section, _ in plan):
        from .peers import peer_versions
        meta["peers"] = peer_versions()
    _table(rows, meta, [s for s in ("ops", "aggregators", "peers") if any(p == s for p, _ in plan)])
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
        _plot(rows, meta, args.plot)
    return 0


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except ImportError:
        return None
