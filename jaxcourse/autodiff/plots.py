"""Figures for chapter 1: several runs' curves on shared axes."""

from __future__ import annotations

import json
import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from jaxcourse.figures import save_figure  # noqa: E402


def read_metrics(workdir: pathlib.Path) -> list[dict]:
    """Rows of a run's metrics.jsonl (read-only: MetricsWriter would truncate it)."""
    path = pathlib.Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def series(rows: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of one metric across the rows that logged it."""
    points = [(r["step"], r[key]) for r in rows if key in r]
    if not points:
        return np.zeros(0), np.zeros(0)
    steps, values = zip(*points)
    return np.asarray(steps), np.asarray(values)


def plot_panels(panels: list[dict], path: pathlib.Path, title: str = "") -> pathlib.Path:
    """One axis per panel dict: {"title", "ylabel", "curves": {label: (x, y)},
    "hlines": {label: y}, "logy": bool}. Returns the PNG path.

    Panels that plot the same curves share one legend, outside the axes on the right, so
    that eight optimizers' labels do not cover their curves."""
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.8), squeeze=False,
                             layout="constrained")
    shared = len(panels) > 1 and len({tuple(p["curves"]) for p in panels}) == 1
    for ax, panel in zip(axes.flat, panels):
        for label, (x, y) in panel["curves"].items():
            ax.plot(x, y, label=label, marker="." if len(x) < 15 else None)
        for k, (label, y) in enumerate(panel.get("hlines", {}).items()):
            ax.axhline(y, linestyle="--", color=f"C{k + len(panel['curves'])}", label=label)
        ys = np.concatenate([np.asarray(y, float) for _, y in panel["curves"].values()] or [[1.0]])
        if panel.get("logy") and ys.min() > 0 and ys.max() / ys.min() > 10:  # log only if it spans a decade
            ax.set_yscale("log")
        ax.set_title(panel["title"])
        ax.set_xlabel(panel.get("xlabel", "step"))
        ax.set_ylabel(panel.get("ylabel", ""))
        ax.grid(alpha=0.3)
        if not shared:
            ax.legend(fontsize=8)
    if shared:
        handles, labels = axes.flat[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside right upper", fontsize=8)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path, dpi=90)
