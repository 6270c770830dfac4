"""Chapter 10's figures: decode cost vs context (log-log), validation-loss curves, recall
accuracy. Each title names the experiment and preset; axes carry units."""
from __future__ import annotations

import json
import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from jaxcourse.figures import save_figure  # noqa: E402


def read_curve(workdir: pathlib.Path, key: str) -> tuple[list, list]:
    """(steps, values) of `key` in a run's metrics.jsonl."""
    path = pathlib.Path(workdir) / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    points = [(r["step"], r[key]) for r in rows if key in r]
    return tuple(map(list, zip(*points))) if points else ([], [])


def plot_decode_cost(contexts, ms: dict[str, list], mib: dict[str, list], title: str,
                     path: pathlib.Path):
    """Left: ms per generated token; middle: decode-state MiB; right: the total time to
    generate a whole context, summed from the measured per-token times (trapezoids):
    attention's grows quadratically, a fixed-size state's linearly."""
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    x = np.asarray(contexts, float)
    totals = {}
    for name in ms:
        style = "o--" if name in ("attention", "hybrid") else "o-"
        axes[0].plot(x, ms[name], style, label=name)
        axes[1].plot(x, mib[name], style, label=name)
        totals[name] = total_seconds(x, ms[name])
        axes[2].plot(x, totals[name], style, label=name)
    anchor = next(iter(totals))  # reference slopes through the first model's last point
    axes[1].plot(x, mib[anchor][-1] * x / x[-1], ":", color="gray", label="∝ context")
    axes[2].plot(x, totals[anchor][-1] * (x / x[-1]) ** 2, ":", color="gray",
                 label="∝ context²")
    axes[2].plot(x, totals[anchor][-1] * x / x[-1], "-.", color="gray", label="∝ context")
    labels = ["ms per generated token (cache at that context)", "decode state (MiB)",
              "est. seconds to generate the whole context"]
    for ax, label in zip(axes, labels):
        ax.set(xscale="log", yscale="log", xlabel="context length (tokens)", ylabel=label)
        ax.grid(True, which="both", alpha=0.3)
    axes[1].legend(fontsize=8)
    axes[2].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_figure(fig, path, dpi=70)


def total_seconds(contexts, ms_per_token) -> np.ndarray:
    """Seconds to generate tokens 0..context, from per-token ms at the measured contexts
    (trapezoids, the first value held back to context 0): an estimate, not a measurement."""
    x = np.concatenate([[0.0], np.asarray(contexts, float)])
    y = np.concatenate([[ms_per_token[0]], ms_per_token])
    return np.cumsum(np.diff(x) * (y[1:] + y[:-1]) / 2) / 1000


def plot_curves(curves: dict[str, tuple], title: str, ylabel: str, path: pathlib.Path):
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name, (x, y) in curves.items():
        ax.plot(x, y, "o-" if len(x) <= 8 else "-", label=name)
    ax.set(xlabel="training step", ylabel=ylabel, title=title)
    ax.title.set_fontsize(9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=80)


def plot_accuracy(names: list[str], accuracy: list[float], chance: float, title: str,
                  path: pathlib.Path):
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.bar(names, accuracy, color="tab:blue")
    ax.axhline(chance, color="gray", ls=":", label=f"chance ({chance:.3f})")
    for i, a in enumerate(accuracy):
        ax.text(i, a + 0.01, f"{a:.2f}", ha="center", fontsize=8)
    ax.set(ylim=(0, 1.05), xlabel="mixer", ylabel="answer accuracy (fraction of queries)",
           title=title)
    ax.title.set_fontsize(9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=80)
