"""Figures of the vision chapter: ViT attention maps, accuracy against the training fraction."""
from __future__ import annotations

import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from jaxcourse.figures import save_figure  # noqa: E402


def class_token_attention(maps_LxBxHxTxT, grid: int) -> np.ndarray:
    """[L, B, grid, grid]: each layer's head-averaged attention of the class token (token 0)
    over the patches, as an image of the patch grid."""
    maps = np.asarray(maps_LxBxHxTxT)
    a = maps.mean(2)[:, :, 0, 1:]
    return a.reshape(a.shape[0], a.shape[1], grid, grid)


def plot_attention(images_BxHxWxC, cls_LxBxGxG, rollout_BxGxG, labels, predictions,
                   path: pathlib.Path, title: str) -> pathlib.Path:
    """One row per image: the image, then where the class token looks in each layer, then the
    attention rollout through all layers."""
    images = np.asarray(images_BxHxWxC)
    n_layer, b = cls_LxBxGxG.shape[:2]
    cols = n_layer + 2
    fig, axes = plt.subplots(b, cols, figsize=(1.5 * cols, 1.5 * b + 0.6), squeeze=False)
    for i in range(b):
        img = images[i]
        axes[i, 0].imshow(img[..., 0] if img.shape[-1] == 1 else np.clip(img, 0, 1),
                          cmap="gray" if img.shape[-1] == 1 else None)
        axes[i, 0].set_ylabel(f"label {labels[i]}\npred {predictions[i]}", fontsize=8)
        for layer in range(n_layer):
            axes[i, layer + 1].imshow(cls_LxBxGxG[layer, i], cmap="viridis")
        axes[i, -1].imshow(rollout_BxGxG[i], cmap="viridis")
    for j, name in enumerate(["image"] + [f"layer {k + 1}" for k in range(n_layer)]
                             + ["rollout"]):
        axes[0, j].set_title(name, fontsize=9)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=10)
    fig.supxlabel("patch column (class-token attention, head mean)", fontsize=9)
    fig.supylabel("patch row", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path, dpi=90)


def plot_fractions(rows: list[dict], path: pathlib.Path, title: str) -> pathlib.Path:
    """Test accuracy against the fraction of the training set, one line per model.
    rows: {"model", "fraction", "test_accuracy"}."""
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = sorted((r["fraction"], r["test_accuracy"]) for r in rows if r["model"] == model)
        ax.plot([f * 100 for f, _ in mine], [a for _, a in mine], "o-", label=model)
    ax.set_xlabel("training examples used (% of the training split)")
    ax.set_ylabel("test accuracy (fraction correct)")
    ax.set_title(title, fontsize=10)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path, dpi=90)


def plot_retrieval(queries: list[str], images_QxKxHxWxC, hits_QxK, path: pathlib.Path,
                   title: str) -> pathlib.Path:
    """Text-to-image retrieval: one row per query caption, its top-K images left to right,
    each framed green when it is the query's own image and red otherwise."""
    q, k = hits_QxK.shape
    fig, axes = plt.subplots(q, k, figsize=(1.5 * k + 2.5, 1.5 * q), squeeze=False)
    for i in range(q):
        for j in range(k):
            ax = axes[i, j]
            ax.imshow(np.clip(images_QxKxHxWxC[i, j], 0, 1), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            for side in ax.spines.values():
                side.set_edgecolor("tab:green" if hits_QxK[i, j] else "tab:red")
                side.set_linewidth(3)
            if j == 0:
                ax.set_ylabel(queries[i], rotation=0, ha="right", va="center", fontsize=8)
            if i == q - 1:
                ax.set_xlabel(f"rank {j + 1}", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.supxlabel("retrieved test images, most similar first (green: the caption's image)",
                  fontsize=8)
    fig.supylabel("query caption", fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path, dpi=90)
