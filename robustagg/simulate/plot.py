"""The simulation's figure, drawn from its JSON document: test accuracy against rounds per attack
(small multiples, one line per defense, the median over seeds), and heatmaps of the final
accuracy and the final backdoor success rate (defense x attack)."""
from __future__ import annotations

import math

import numpy as np

from .claims import SEED_PAPERS, Cells

COLUMNS = 5


def _curves(cells: Cells, aggregator: str, attack: str) -> np.ndarray:
    """Median accuracy per round over the seeds."""
    return np.median([[r["accuracy"] for r in run["rounds"]] for run in cells.runs[aggregator, attack]], axis=0)


def _heatmap(ax, cells: Cells, aggregators, attacks, what: str, title: str, cmap: str, names: bool):
    grid = np.full((len(aggregators), len(attacks)), np.nan)
    for i, agg in enumerate(aggregators):
        for j, attack in enumerate(attacks):
            if cells.has(agg, attack):
                grid[i, j] = cells.median(agg, attack, what)
    image = ax.imshow(grid, vmin=0, vmax=1, cmap=cmap, aspect="auto")
    ax.set_xticks(range(len(attacks)), attacks, rotation=40, ha="right")
    ax.set_yticks(range(len(aggregators)), aggregators if names else [])
    for (i, j), value in np.ndenumerate(grid):
        if not np.isnan(value):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7,
                    color="black" if value > 0.55 else "white")
    ax.set_title(title)
    return image


def plot(document: dict, path: str) -> None:
    """Write the figure of a ``python -m robustagg simulate`` JSON document to ``path`` (PNG)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    meta, cells = document["meta"], Cells(document["runs"])
    aggregators, attacks = cells.aggregators(), cells.attacks()
    rows = math.ceil(len(attacks) / COLUMNS)
    columns = min(COLUMNS, len(attacks))
    heat_height = 0.28 * len(aggregators) + 1.5
    fig = plt.figure(figsize=(3.6 * max(columns, 4), 2.9 * rows + heat_height + 1.6))
    grid = fig.add_gridspec(rows + 1, 2 * columns, height_ratios=[2.9] * rows + [heat_height], hspace=0.45,
                            wspace=0.9)
    colors = plt.get_cmap("tab20").colors
    for k, attack in enumerate(attacks):
        ax = fig.add_subplot(grid[k // columns, 2 * (k % columns): 2 * (k % columns) + 2])
        for i, agg in enumerate(aggregators):
            if cells.has(agg, attack):
                curve = _curves(cells, agg, attack)
                ax.plot(range(1, len(curve) + 1), curve, color=colors[i % len(colors)],
                        linestyle="-" if i < len(colors) else "--", linewidth=2.0 if agg in SEED_PAPERS else 1.0,
                        label=agg)
        ax.set_title(attack)
        ax.set_ylim(0, 1)
        ax.set_xlabel("round")
        if k % columns == 0:
            ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
    handles = {line.get_label(): line for ax in fig.axes for line in ax.get_lines()}
    top = 1.0 - 1.1 / fig.get_figheight()
    fig.legend(handles.values(), handles.keys(), loc="upper left", fontsize=8, ncol=1, bbox_to_anchor=(0.855, top),
               title="defense\n(thick: seed defenses)")
    half = columns
    for span, what, title, cmap, names in (
            (slice(None, half), "final_accuracy", "final test accuracy", "viridis", True),
            (slice(half, None), "final_asr", "final backdoor success rate\n(where the attack is another: the base "
                                             "rate of the trigger)", "magma", False)):
        ax = fig.add_subplot(grid[rows, span])
        fig.colorbar(_heatmap(ax, cells, aggregators, attacks, what, title, cmap, names), ax=ax, fraction=0.04,
                     pad=0.02)
    fig.suptitle(f"robustagg simulate: digits, preset {meta['preset']}, {meta['clients']} clients of which "
                 f"{meta['byzantine']} Byzantine, Dirichlet alpha {meta['alpha']}, {meta['rounds']} rounds; median "
                 f"of seeds {meta['seeds']}\n{meta['device']}, commit {meta['commit']}", fontsize=11)
    fig.subplots_adjust(left=0.09, right=0.84, top=top, bottom=1.2 / fig.get_figheight())
    fig.savefig(path, dpi=110)
    plt.close(fig)
