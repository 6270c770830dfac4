"""PNG figures of chapter 8: sample grids, denoising strips, quality-vs-steps curves."""
from __future__ import annotations

import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from jaxcourse.figures import save_figure  # noqa: E402


def grid(images01: np.ndarray, rows: int) -> np.ndarray:
    """[N, H, W, C] in [0, 1] -> one [rows*(H+1)-1, cols*(W+1)-1, C] mosaic, 1-px gaps."""
    n, h, w, c = images01.shape
    cols = -(-n // rows)
    out = np.ones((rows * (h + 1) - 1, cols * (w + 1) - 1, c), np.float32)
    for i, img in enumerate(images01):
        r, k = divmod(i, cols)
        out[r * (h + 1):r * (h + 1) + h, k * (w + 1):k * (w + 1) + w] = img
    return out


def save_grid(images01: np.ndarray, rows: int, path: pathlib.Path, title: str,
              row_labels: list[str] | None = None, xlabel: str = "sample",
              ylabel: str = "") -> pathlib.Path:
    """The images as one mosaic, `rows` rows; row_labels name the rows (classes, scales)."""
    mosaic = grid(np.asarray(images01, np.float32), rows)
    h, w = mosaic.shape[:2]
    scale = max(1.0, 360.0 / max(h, w)) / 72.0
    fig, ax = plt.subplots(figsize=(max(w * scale, 3.0), max(h * scale, 2.0) + 0.4))
    if mosaic.shape[-1] == 1:
        ax.imshow(mosaic[..., 0], cmap="gray_r" if row_labels is not None else "gray",
                  vmin=0, vmax=1, interpolation="nearest")
    else:
        ax.imshow(mosaic, interpolation="nearest")
    ax.set_xticks([])
    if row_labels:
        size = images01.shape[1] + 1
        ax.set_yticks([size * i + size / 2 - 1 for i in range(len(row_labels))], row_labels)
    else:
        ax.set_yticks([])
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel or ("row" if row_labels else "image"))
    fig.tight_layout()
    return save_figure(fig, path, dpi=100)


def plot_quality(rows: list[dict], path: pathlib.Path, floor: float | None = None):
    """Fréchet distance (left) and judge accuracy (right) against sampling steps, per sampler."""
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for kind in dict.fromkeys(r["sampler"] for r in rows):
        pts = sorted((r["steps"], r["frechet"], r["accuracy"]) for r in rows
                     if r["sampler"] == kind)
        steps, fd, acc = zip(*pts)
        axes[0].plot(steps, fd, marker="o", label=kind)
        axes[1].plot(steps, acc, marker="o", label=kind)
    if floor is not None:
        axes[0].axhline(floor, color="gray", ls="--", lw=1, label="real vs real")
    names = ("Fréchet distance (judge features)", "judge accuracy")
    ylabels = ("Fréchet distance (lower is better)", "accuracy on requested class (fraction)")
    for ax, name, ylabel in zip(axes, names, ylabels):
        ax.set_xscale("log")
        ax.set_xlabel("sampling steps (network evaluations)")
        ax.set_ylabel(ylabel)
        ax.set_title(name, fontsize=10)
        ax.legend()
    axes[0].set_yscale("log")
    fig.suptitle("sample quality vs sampling steps, per sampler")
    fig.tight_layout()
    return save_figure(fig, path, dpi=100)
