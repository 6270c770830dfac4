"""Per-device memory: what the state takes, what a compiled step needs, what fits a budget.

Three numbers answer "does it fit": the bytes of the training state each device holds
(parameters + optimizer moments, divided by FSDP), the temporaries of the compiled step
(activations kept for the backward pass, which remat trades for recomputation and bf16
halves), and their sum. XLA reports the last two after compiling, without running anything:
`jit(step).lower(abstract args).compile().memory_analysis()`.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import jax
import numpy as np


def leaf_bytes_per_device(leaf) -> int:
    """Bytes of one array (or ShapeDtypeStruct with a sharding) on one device."""
    shape = tuple(leaf.shape)
    sharding = getattr(leaf, "sharding", None)
    if sharding is not None:
        shape = sharding.shard_shape(shape)
    return math.prod(shape) * np.dtype(leaf.dtype).itemsize


def bytes_per_device(tree) -> int:
    """Bytes one device holds of a tree of (possibly sharded) arrays."""
    return sum(leaf_bytes_per_device(x) for x in jax.tree.leaves(tree) if hasattr(x, "shape"))


def compiled_memory(compiled) -> dict[str, int]:
    """XLA's per-device memory estimate of a compiled function, in bytes.

    total = arguments + outputs + temporaries - aliased (donated inputs reused as outputs).
    """
    stats = compiled.memory_analysis()
    out = {
        "arguments": int(stats.argument_size_in_bytes),
        "outputs": int(stats.output_size_in_bytes),
        "temporaries": int(stats.temp_size_in_bytes),
        "aliased": int(stats.alias_size_in_bytes),
    }
    out["total"] = out["arguments"] + out["outputs"] + out["temporaries"] - out["aliased"]
    return out


def largest_fitting(fits: Callable[[int], bool], lo: int, hi: int) -> int:
    """Largest k in [lo, hi] with fits(k), assuming fits is monotone (true then false).

    Binary search: about log2(hi - lo) compiles. Returns lo - 1 when even lo does not fit.
    """
    if not fits(lo):
        return lo - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def mib(n_bytes: float) -> float:
    return n_bytes / 2 ** 20


def plot_probes(probes: dict, width_unit: int, budget_mib: float, path) -> None:
    """Compiled memory against d_model, one line per variant, with the budget dashed."""
    import matplotlib  # noqa: PLC0415 (plotting only here)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    from jaxcourse.figures import save_figure  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, seen in probes.items():
        ks = sorted(seen)
        ax.plot([k * width_unit for k in ks], [mib(seen[k]["total"]) for k in ks],
                marker="o", label=label)
    ax.axhline(budget_mib, color="k", linestyle="--", label="budget")
    ax.set_xlabel("model width d_model (features)")
    ax.set_ylabel("compiled step memory per device (MiB)")
    ax.set_title(f"training-step memory vs width, budget {budget_mib:g} MiB per device")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
