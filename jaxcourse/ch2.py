"""Chapter 2: deep nets and regularization.

    python -m jaxcourse.ch2                      # ResNet on digits, cpu preset
    python -m jaxcourse.ch2 --config=configs/ch2_ablation.py

Lab: MLP / CNN / ResNet with batch norm (Flax's and our own, shown equal), dropout, weight
decay, label smoothing, mixup, CutMix, crop/flip augmentation, early stopping, one-cycle LR.
"""
import dataclasses
import pathlib

import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from jaxcourse import cli  # noqa: E402
from jaxcourse.figures import save_figure  # noqa: E402
from jaxcourse.models.classifier import ClassifierConfig, build_classifier  # noqa: E402
from jaxcourse.models import batchnorm  # noqa: E402
from jaxcourse.vision import task as task_lib  # noqa: E402


def splits(cfg) -> dict[str, dict[str, np.ndarray]]:
    """train / val (held out of train, for eval and early stopping) / test."""
    return task_lib.splits(cfg)


def fit(cfg, workdir: pathlib.Path, data: dict) -> dict:
    """Trains the configured classifier; returns val/test accuracy and loop metrics."""
    num_classes = int(data["train"]["label"].max()) + 1
    model_cfg = ClassifierConfig(**cfg.model.to_dict(), num_classes=num_classes)
    model_cfg = dataclasses.replace(model_cfg, stages=tuple(model_cfg.stages))
    return task_lib.fit(build_classifier(model_cfg), cfg, workdir, data, num_classes)[1]


def batchnorm_check(seed: int = 0) -> float:
    """Max |ours - flax| over outputs and running stats, in train then eval mode."""
    import flax.linen as nn

    x = jax.random.normal(jax.random.PRNGKey(seed), (16, 4, 4, 8)) * 3 + 1
    ours, theirs = batchnorm.BatchNorm(momentum=0.9), nn.BatchNorm(momentum=0.9)
    v = theirs.init(jax.random.PRNGKey(1), x, use_running_average=False)
    diffs = []
    y1, s1 = ours.apply(v, x, use_running_average=False, mutable=["batch_stats"])
    y2, s2 = theirs.apply(v, x, use_running_average=False, mutable=["batch_stats"])
    diffs += [jnp.abs(y1 - y2).max()]
    diffs += jax.tree.leaves(jax.tree.map(lambda a, b: jnp.abs(a - b).max(), s1, s2))
    e1 = ours.apply({**v, **s1}, x, use_running_average=True)
    e2 = theirs.apply({**v, **s2}, x, use_running_average=True)
    diffs += [jnp.abs(e1 - e2).max()]
    return float(max(diffs))


def run_classify(cfg, workdir: pathlib.Path) -> dict:
    """Trains one classifier (model, regularizers from config); val and test accuracy."""
    result = fit(cfg, workdir, splits(cfg))
    result["batchnorm_scratch_vs_flax_max_abs_diff"] = batchnorm_check()
    print(f"test accuracy {result['test_accuracy']:.4f} (val {result['val_accuracy']:.4f})")
    return result


def variant_config(cfg, name: str):
    """The plain baseline with one regularizer switched on (or all of them)."""
    v = cfg.copy_and_resolve_references()
    v.model.dropout, v.model.norm = 0.0, "none"
    v.optimizer.weight_decay, v.optimizer.schedule = 0.0, "constant"
    v.reg.label_smoothing = v.reg.mixup_alpha = v.reg.cutmix_alpha = 0.0
    v.reg.crop_pad, v.train.patience = 0, 0
    on = {
        "dropout": lambda: setattr(v.model, "dropout", 0.2),
        "weight_decay": lambda: setattr(v.optimizer, "weight_decay", 5e-2),
        "label_smoothing": lambda: setattr(v.reg, "label_smoothing", 0.1),
        "augment": lambda: setattr(v.reg, "crop_pad", 1),
        "mixup": lambda: setattr(v.reg, "mixup_alpha", 0.2),
        "cutmix": lambda: setattr(v.reg, "cutmix_alpha", 1.0),
        "batchnorm": lambda: setattr(v.model, "norm", "batchnorm"),
        "early_stopping": lambda: setattr(v.train, "patience", 2),
    }
    if name == "all":
        for k, switch in on.items():
            if k != "cutmix":  # mixup and CutMix together would double-mix every batch.
                switch()
        v.optimizer.schedule = "onecycle"
    elif name != "none":
        on[name]()
    return v


def run_ablation(cfg, workdir: pathlib.Path) -> dict:
    """A plain baseline with one regularizer switched on at a time (cfg.variants)."""
    data = splits(cfg)
    rows = {}
    for name in cfg.variants:
        with cfg.unlocked():
            v = variant_config(cfg, name)
        print(f"--- ablation variant: {name}")
        r = fit(v, workdir / "variants" / name, data)
        rows[name] = {k: r[k] for k in ("val_accuracy", "test_accuracy", "test_loss", "steps")}
    lines = ["| variant | val acc | test acc | test loss | steps |", "|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['val_accuracy']:.4f} | {r['test_accuracy']:.4f} | "
                     f"{r['test_loss']:.4f} | {r['steps']} |")
    (workdir / "ablation.md").write_text("\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(6, 0.4 * len(rows) + 1.2))
    names = list(rows)
    ax.barh(names, [rows[n]["test_accuracy"] for n in names], color="tab:blue")
    lo = min(rows[n]["test_accuracy"] for n in names)
    ax.set_xlim(max(0.0, lo - 0.05), 1.0)
    ax.set_xlabel("test accuracy (fraction correct)")
    ax.set_ylabel("regularizer added to the plain baseline")
    ax.set_title(f"regularizer ablation on {cfg.data.name}, {cfg.train.steps} steps each")
    ax.invert_yaxis()
    fig.tight_layout()
    save_figure(fig, workdir / "ablation.png", dpi=90)
    print("\n".join(lines))
    return {f"{n}/{k}": v for n, r in rows.items() for k, v in r.items()}


EXPERIMENTS = {"classify": run_classify, "ablation": run_ablation}


def main(argv=None):
    return cli.run_chapter("ch2", EXPERIMENTS, default_config="ch2_digits", argv=argv)


if __name__ == "__main__":
    main()
