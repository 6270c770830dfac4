"""Figures of what the routers did (chapter 7): gates over training, domain traffic, tokens."""
from __future__ import annotations

import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from jaxcourse.figures import save_figure  # noqa: E402


def plot_gates(snapshots: list[tuple[int, np.ndarray]], path: pathlib.Path) -> None:
    """Per MoE layer, the share of assignments per expert at each snapshot (stacked bars)."""
    steps = [s for s, _ in snapshots]
    loads = np.stack([f for _, f in snapshots])  # [S, L, E]
    n_layers, n_experts = loads.shape[1:]
    fig, axes = plt.subplots(1, n_layers, figsize=(3.2 * n_layers, 3.2), sharey=True,
                             squeeze=False)
    colors = plt.cm.tab10(np.arange(n_experts) % 10)
    x = np.arange(len(steps))
    for layer, ax in enumerate(axes[0]):
        bottom = np.zeros(len(steps))
        for e in range(n_experts):
            ax.bar(x, loads[:, layer, e], bottom=bottom, color=colors[e], label=f"expert {e}")
            bottom += loads[:, layer, e]
        ax.set_xticks(x, [str(s) for s in steps])
        ax.set_title(f"layer {layer}")
        ax.set_xlabel("training step")
    axes[0, 0].set_ylabel("share of token assignments")
    axes[0, -1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.suptitle("ch7 MoE: gate distribution per layer over training (validation tokens)")
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def plot_traffic(traffic_LxDxE: np.ndarray, domains: list[str], path: pathlib.Path) -> None:
    """Per MoE layer, a domain x expert heatmap of where each domain's tokens go."""
    n_layers, _, n_experts = traffic_LxDxE.shape
    fig, axes = plt.subplots(1, n_layers, figsize=(3.0 * n_layers + 1, 2.6), squeeze=False)
    vmax = float(traffic_LxDxE.max())
    for layer, ax in enumerate(axes[0]):
        im = ax.imshow(traffic_LxDxE[layer], cmap="viridis", vmin=0, vmax=vmax, aspect="auto")
        ax.set_xticks(range(n_experts))
        ax.set_yticks(range(len(domains)), domains if layer == 0 else [""] * len(domains))
        ax.set_xlabel("expert")
        ax.set_title(f"layer {layer}")
    axes[0, 0].set_ylabel("domain")
    fig.colorbar(im, ax=axes[0].tolist(), label="share of the domain's assignments")
    fig.suptitle("ch7 MoE: token-to-expert traffic by domain", y=1.06)
    save_figure(fig, path, dpi=110)


def plot_top_tokens(tops: list[list[tuple[int, float]]], tokenizer, path: pathlib.Path,
                    title: str) -> None:
    """A table: per expert, the characters it takes most often (share of their assignments)."""
    n_experts, n = len(tops), len(tops[0])
    fig, ax = plt.subplots(figsize=(1.1 * n + 1.5, 0.42 * n_experts + 1.0))
    shares = np.array([[s for _, s in row] for row in tops])
    ax.imshow(shares, cmap="Blues", vmin=0, vmax=1, aspect="auto")
    for e, row in enumerate(tops):
        for j, (tok, share) in enumerate(row):
            ax.text(j, e, f"{tokenizer.decode([tok])!r}\n{share:.2f}", ha="center",
                    va="center", fontsize=7)
    ax.set_yticks(range(n_experts), [f"expert {e}" for e in range(n_experts)])
    ax.set_xticks(range(n), [f"#{j + 1}" for j in range(n)])
    ax.set_xlabel("rank (character, share of its assignments to this expert)")
    ax.set_ylabel("expert")
    ax.set_title(title)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
