"""PNG plots of the rows (matplotlib, drawn off-screen): Dice per dataset (Fig. 3 style, runs side by side),
Dice per target, and Dice with and without the sliding window (Fig. 4 style violins) when two runs differ in it.

Figures are built with matplotlib's object API and the Agg canvas, so no global backend is switched (the Slicer
module and notebooks keep theirs).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import R1SegError
from .report import segmentation_rows

# Fig. 3 draws R1Seg-3D in red and M3D-LaMed in black.
RUN_COLOURS = ("#d62728", "#222222")
# Fig. 4's targets: four organs and four lesion labels; the plot takes those present, else the most frequent.
FIG4_TARGETS = ("liver", "stomach", "pancreas", "thyroid gland", "tumor", "liver tumor", "kidney cyst", "colon tumor")
MAX_VIOLIN_TARGETS = 8


def _figure(width: float, height: float):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise R1SegError("the evaluation's plots need matplotlib: pip install 'r1seg3d[eval]'") from None

    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def _dice_by(rows: list[dict], key: str) -> dict[str, list[float]]:
    values: dict[str, list[float]] = {}
    for row in segmentation_rows(rows):
        values.setdefault(str(row[key]), []).append(100 * row["dice"])
    return values


def box_plot(path: Path, runs: list[tuple[str, list[dict]]], key: str, title: str) -> Path:
    """Dice (%) per value of `key`, one box per run side by side."""
    per_run = [_dice_by(rows, key) for _, rows in runs]
    groups = sorted(set().union(*per_run))
    width = 1.0 / (len(runs) + 1)
    figure = _figure(max(6.0, 0.6 * len(groups) * len(runs) + 2), 4.5)
    axes = figure.add_subplot()
    for index, ((name, _), values) in enumerate(zip(runs, per_run)):
        present = [g for g in groups if values.get(g)]
        positions = [groups.index(g) + (index - (len(runs) - 1) / 2) * width for g in present]
        colour = RUN_COLOURS[index % len(RUN_COLOURS)]
        if present:
            axes.boxplot([values[g] for g in present], positions=positions, widths=width * 0.9, manage_ticks=False,
                         boxprops={"color": colour}, medianprops={"color": colour}, whiskerprops={"color": colour},
                         capprops={"color": colour}, flierprops={"markeredgecolor": colour})
        axes.plot([], [], color=colour, label=name)
    axes.set_xticks(range(len(groups)), groups, rotation=45, ha="right", fontsize=8)
    axes.set_xlim(-0.7, max(len(groups), 1) - 0.3)
    axes.set_ylim(-2, 102)
    axes.set_ylabel("F1 / Dice (%)")
    axes.set_title(title)
    axes.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    return path


def _violin_targets(runs) -> list[str]:
    counts: dict[str, int] = {}
    for _, rows in runs:
        for row in segmentation_rows(rows):
            counts[row["target"]] = counts.get(row["target"], 0) + 1
    chosen = [t for t in FIG4_TARGETS if t in counts] or sorted(counts, key=lambda t: -counts[t])
    return chosen[:MAX_VIOLIN_TARGETS]


def sliding_window_violins(path: Path, with_window: list[dict], without_window: list[dict]) -> Path:
    """Fig. 4: per target, Dice with the sliding window (left) and with the whole CT in one window (right)."""
    runs = [("with sliding window", with_window), ("without sliding window", without_window)]
    targets = _violin_targets(runs)
    figure = _figure(max(6.0, 1.6 * len(targets)), 4.5)
    axes = figure.add_subplot()
    for index, (name, rows) in enumerate(runs):
        values = _dice_by(rows, "target")
        present = [t for t in targets if len(values.get(t, ())) > 0]
        positions = [targets.index(t) + (index - 0.5) * 0.4 for t in present]
        colour = RUN_COLOURS[index]
        if present:
            # A violin needs spread: a single value is drawn as a point instead.
            spread = [t for t in present if np.ptp(values[t]) > 0]
            if spread:
                parts = axes.violinplot([values[t] for t in spread], [positions[present.index(t)] for t in spread],
                                        widths=0.35, showmedians=True)
                for body in parts["bodies"]:
                    body.set_facecolor(colour)
            axes.scatter(positions, [np.median(values[t]) for t in present], color=colour, s=12, zorder=3)
        axes.plot([], [], color=colour, label=name)
    axes.set_xticks(range(len(targets)), targets, rotation=30, ha="right", fontsize=8)
    axes.set_ylim(-2, 102)
    axes.set_ylabel("F1 / Dice (%)")
    axes.set_title("Sliding window vs whole CT in one window (Fig. 4)")
    axes.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    return path


def plot_run(out: Path, rows: list[dict]) -> list[Path]:
    run = [(out.name, rows)]
    return [box_plot(out / "dice_by_dataset.png", run, "dataset", "Dice per dataset (Fig. 3)"),
            box_plot(out / "dice_by_target.png", run, "target", "Dice per target")]


def plot_comparison(out: Path, runs) -> list[Path]:
    pairs = [(name, rows) for name, _, rows in runs]
    plots = [box_plot(out / "dice_by_dataset.png", pairs, "dataset", "Dice per dataset (Fig. 3)"),
             box_plot(out / "dice_by_target.png", pairs, "target", "Dice per target")]
    sliding = {identity["settings"]["sliding_window"]: rows for _, identity, rows in runs}
    if len(sliding) == 2:
        plots.append(sliding_window_violins(out / "sliding_window_violins.png", sliding[True], sliding[False]))
    return plots
