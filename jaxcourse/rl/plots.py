"""Chapter 6 figures: per-seed return curves and the hyper-parameter stress grid."""
import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from jaxcourse.figures import save_figure  # noqa: E402


def return_curves(returns_SxU: np.ndarray, path: pathlib.Path, title: str,
                  steps_per_update: int) -> pathlib.Path:
    """Each agent's return curve (thin) and their mean (thick) against env steps."""
    x = (np.arange(returns_SxU.shape[1]) + 1) * steps_per_update
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for r in returns_SxU:
        ax.plot(x, r, lw=0.6, alpha=0.5)
    ax.plot(x, returns_SxU.mean(0), lw=2.0, color="black", label="mean")
    ax.set_xlabel("environment steps per agent")
    ax.set_ylabel("episode return")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    return save_figure(fig, path, dpi=90)


def stress_grid(final_KxExC: np.ndarray, kl_coefs, ent_coefs, clip_eps, path: pathlib.Path,
                title: str) -> pathlib.Path:
    """One heat map per KL coefficient: final return over (entropy coef, clip range)."""
    k = len(kl_coefs)
    fig, axes = plt.subplots(1, k, figsize=(3.8 * k + 0.8, 3.4), squeeze=False)
    vmax = max(float(final_KxExC.max()), 1.0)
    for ax, kl, grid in zip(axes[0], kl_coefs, final_KxExC):
        im = ax.imshow(grid, vmin=0, vmax=vmax, cmap="viridis", origin="lower")
        ax.set_xticks(range(len(clip_eps)), [f"{c:g}" for c in clip_eps])
        ax.set_yticks(range(len(ent_coefs)), [f"{e:g}" for e in ent_coefs])
        ax.set_xlabel("clip range eps")
        ax.set_ylabel("entropy coef")
        ax.set_title(f"KL coef {kl:g}")
        for (i, j), v in np.ndenumerate(grid):
            ax.text(j, i, f"{v:.0f}", ha="center", va="center",
                    color="white" if v < vmax / 2 else "black", fontsize=8)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.85, label="final return")
    fig.suptitle(title)
    return save_figure(fig, path, dpi=90)
