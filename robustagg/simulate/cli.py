"""``python -m robustagg simulate``: federated training on digits under attack, every defense,
claims and a figure (docs/simulate.md)."""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

from .claims import Cells
from .experiment import ATTACKS, DEFENSES, PRESETS, document, run_all, with_overrides


def _names(allowed, what):
    def parse(text):
        names = list(dict.fromkeys(name for name in text.split(",") if name))
        unknown = [name for name in names if name not in allowed]
        if unknown or not names:
            raise argparse.ArgumentTypeError(f"{what} {unknown or text!r} not known; choose from {', '.join(allowed)}")
        return tuple(names)
    return parse


def _positive(kind):
    def parse(text):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{text} must be > 0")
        return value
    return parse


def _seeds(text):
    try:
        seeds = tuple(dict.fromkeys(int(s) for s in text.split(",") if s))
    except ValueError:
        raise argparse.ArgumentTypeError(f"seeds {text!r} must be comma-separated ints") from None
    if not seeds or min(seeds) < 0:
        raise argparse.ArgumentTypeError(f"seeds {text!r} must be one or more ints >= 0")
    return seeds


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m robustagg simulate", description=__doc__)
    p.add_argument("--preset", choices=sorted(PRESETS), default="quick",
                   help="quick: the runs the claims need, about 3 minutes on 2 cores; full: every aggregator "
                        "against every attack, about 12 minutes")
    p.add_argument("--aggregators", type=_names(DEFENSES, "aggregators"),
                   help="comma-separated names (default: the preset's): " + ", ".join(DEFENSES))
    p.add_argument("--attacks", type=_names(ATTACKS, "attacks"),
                   help="comma-separated names (default: the preset's): " + ", ".join(ATTACKS))
    p.add_argument("--rounds", type=_positive(int), help="federated rounds (default: the preset's)")
    p.add_argument("--alpha", type=_positive(float), help="Dirichlet concentration of the split (default 1.0)")
    p.add_argument("--seeds", type=_seeds, help="comma-separated seeds (default 0,1,2); claims use their median")
    p.add_argument("--clients", type=_positive(int), help="clients (default 20)")
    p.add_argument("--byzantine", type=int, help="Byzantine clients among them (default 4)")
    p.add_argument("--jobs", type=_positive(int), default=os.cpu_count() or 1,
                   help="worker processes, one torch thread each (default: one per core)")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON")
    p.add_argument("--plot", metavar="PATH", help="write the figure as PNG")
    return p


def _tables(doc: dict):
    from rich.console import Console
    from rich.table import Table

    cells = Cells(doc["runs"])
    attacks = cells.attacks()
    meta = doc["meta"]
    table = Table(title=f"final test accuracy, median of seeds {meta['seeds']} ({meta['rounds']} rounds; "
                        "backdoor: accuracy / ASR)")
    table.add_column("defense", no_wrap=True)
    for attack in attacks:
        table.add_column(attack, justify="right", no_wrap=True)
    table.add_column("agg ms", justify="right")
    for agg in cells.aggregators():
        row = []
        for attack in attacks:
            if not cells.has(agg, attack):
                row.append("-")
            elif attack == "backdoor":
                row.append(f"{cells.acc(agg, attack):.3f} / {cells.asr(agg, attack):.2f}")
            else:
                row.append(f"{cells.acc(agg, attack):.3f}")
        ms = [r["agg_ms"] for attack in attacks for run in cells.runs[agg, attack] for r in run["rounds"]]
        table.add_row(agg, *row, f"{statistics.median(ms):.1f}")
    console = Console(width=max(40 + 12 * len(attacks), Console().width))
    console.print(table)
    for agg, attack in cells.runs:
        raised, total, message = cells.errors(agg, attack)
        if raised:
            console.print(f"{agg} / {attack}: the aggregator raised in {raised} of {total} rounds (the model was "
                          f"kept): {message}", markup=False)
    claims = Table(title="claims", show_lines=True)
    for col in ("claim", "holds", "evidence"):
        claims.add_column(col, overflow="fold")
    for c in doc["claims"]:
        claims.add_row(f"{c['claim']}\n[dim]{c['seed_paper']}[/dim]", "yes" if c["holds"] else "[bold red]no[/]",
                       c["evidence"])
    console.print(claims)


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    config = with_overrides(PRESETS[args.preset], aggregators=args.aggregators, attacks=args.attacks,
                            rounds=args.rounds, alpha=args.alpha, seeds=args.seeds, clients=args.clients,
                            byzantine=args.byzantine)
    if not 0 <= config.byzantine < config.clients:
        parser().error(f"--byzantine {config.byzantine} must be in [0, {config.clients - 1}] for {config.clients} "
                       "clients")
    from rich.progress import Progress

    start = time.perf_counter()
    with Progress(transient=False) as progress:
        bar = progress.add_task(f"{len(config.tasks())} runs on {args.jobs} processes", total=len(config.tasks()))
        try:
            runs = run_all(config, jobs=args.jobs, on_done=lambda run: progress.advance(bar))
        except ValueError as e:    # a split or a rule that these clients cannot have, named by the error
            parser().error(str(e))
    doc = document(config, runs, args.jobs)
    doc["meta"]["wall_s"] = round(time.perf_counter() - start, 1)
    _tables(doc)
    print(f"{len(runs)} runs in {doc['meta']['wall_s']} s", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(doc, f)
    if args.plot:
        from .plot import plot
        plot(doc, args.plot)
    return 0
