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


def plot_fractions(rows: list[dict], path: pathlib.Path, title: str,
                   xlabel: str = "training examples used (% of the training split)",
                   log_x: bool = False) -> pathlib.Path:
    """Test accuracy against the fraction of the training set, one line per model.
    rows: {"model", "fraction", "test_accuracy"}."""
    fig, ax = plt.subplots(figsize=(5, 3.5))
    if log_x:
        ax.set_xscale("log")
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = sorted((r["fraction"], r["test_accuracy"]) for r in rows if r["model"] == model)
        ax.plot([f * 100 for f, _ in mine], [a for _, a in mine], "o-", label=model)
    ax.set_xlabel(xlabel)
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


def plot_reconstructions(images_BxHxWxC, masked_BxHxWxC, pasted_BxHxWxC, path: pathlib.Path,
                         title: str) -> pathlib.Path:
    """MAE: one column per image; rows are the original, what the encoder saw (hidden patches
    black) and the reconstruction (visible patches as given, hidden ones predicted)."""
    rows = [("original", images_BxHxWxC), ("visible to the encoder", masked_BxHxWxC),
            ("reconstruction", pasted_BxHxWxC)]
    b = images_BxHxWxC.shape[0]
    fig, axes = plt.subplots(3, b, figsize=(1.3 * b + 1.5, 4.2), squeeze=False)
    lo, hi = float(np.min(images_BxHxWxC)), float(np.max(images_BxHxWxC))
    for i, (name, x) in enumerate(rows):
        for j in range(b):
            ax = axes[i, j]
            img = np.asarray(x[j])
            ax.imshow(img[..., 0] if img.shape[-1] == 1 else np.clip(img, 0, 1),
                      cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
        axes[i, 0].set_ylabel(name, fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.supxlabel("test image", fontsize=8)
    fig.supylabel("input / masked / reconstructed", fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path, dpi=90)


def plot_collapse(rows: list[dict], log_k: float, path: pathlib.Path, title: str) -> pathlib.Path:
    """DINO's collapse monitor over training: per-image teacher entropy, entropy of the
    batch-mean teacher output (both against log K, the uniform output), and KL(teacher ||
    student). rows: metrics.jsonl rows with train/teacher_entropy, batch_entropy, kl."""
    steps = [r["step"] for r in rows]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(9, 3.3))
    ax.plot(steps, [r["train/teacher_entropy"] for r in rows], label="teacher entropy per image")
    ax.plot(steps, [r["train/batch_entropy"] for r in rows], label="entropy of the batch mean")
    ax.axhline(log_k, color="gray", ls="--", label="log K (uniform)")
    ax.set_xlabel("step")
    ax.set_ylabel("entropy (nats)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    bx.plot(steps, [r["train/kl"] for r in rows], color="tab:red")
    bx.set_xlabel("step")
    bx.set_ylabel("KL(teacher || student) (nats)")
    bx.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path, dpi=90)


def plot_vqa(images_NxHxWxC, questions: list[str], predicted: list[str], truth: list[str],
             path: pathlib.Path, title: str, cols: int = 5) -> pathlib.Path:
    """VQA examples: each image with its question, the model's answer and the true one
    (green when they match, red otherwise)."""
    n = len(questions)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.3 * cols, 2.9 * rows + 0.6), squeeze=False,
                             layout="constrained")
    for i, ax in enumerate(axes.ravel()):
        ax.set_xticks([])
        ax.set_yticks([])
        if i >= n:
            ax.axis("off")
            continue
        ax.imshow(np.clip(images_NxHxWxC[i], 0, 1), interpolation="nearest")
        ok = predicted[i] == truth[i]
        ax.set_title(questions[i], fontsize=7)
        ax.set_xlabel(f"answer: {predicted[i]}\ntrue: {truth[i]}", fontsize=7,
                      color="tab:green" if ok else "tab:red")
        for side in ax.spines.values():
            side.set_edgecolor("tab:green" if ok else "tab:red")
            side.set_linewidth(3)
    fig.suptitle(title, fontsize=10)
    fig.supxlabel("generated answer and the true one (green: exact match)", fontsize=8)
    fig.supylabel("held-out scene", fontsize=8)
    return save_figure(fig, path, dpi=90)
