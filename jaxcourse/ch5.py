"""Chapter 5: multimodal transformers (so far: ViT on digits, ViT vs CNN).

    python -m jaxcourse.ch5                                    # ViT on the embedded digits
    python -m jaxcourse.ch5 --config=configs/ch5_vit_vs_cnn.py # ViT vs chapter 2's ResNet

Lab: a Vision Transformer (models/vit.py: patches as a conv or a reshape, class token or
mean pooling, learned or 2-D sin-cos positions, the shared non-causal block stack) trained
with the one loop and chapter 2's classification task; where its class token looks in each
layer; then chapter 2's ResNet beside a ViT of the same parameter count, on the same data
with the same steps: accuracy, step time, and both at smaller fractions of the training
set. Swin (models/swin.py) and the generated image-text scenes (data/scenes.py) are the
library pieces the contrastive, MAE, DINO and VQA labs of this chapter build on.
"""
import dataclasses
import pathlib

import numpy as np

from jaxcourse import cli, config
from jaxcourse.errors import UserError
from jaxcourse.lm.params import count_params
from jaxcourse.models.classifier import ClassifierConfig, build_classifier
from jaxcourse.models.vit import ViTClassifier, attention_maps, attention_rollout, vit_config
from jaxcourse.report import markdown_table, write_results
from jaxcourse.vision import plots
from jaxcourse.vision import task as task_lib


def num_classes_of(data) -> int:
    return int(data["train"]["label"].max()) + 1


def vit_model_config(cfg, data):
    """The ViTConfig of cfg.model, sized by the data (image size, channels, classes)."""
    _, h, w, c = data["train"]["image"].shape
    if h != w:
        raise UserError(f"the ViT takes square images, got {h}x{w}")
    return vit_config(cfg.model, image_size=h, channels=c, num_classes=num_classes_of(data))


def cnn_run(cfg):
    """The CNN's run config: cfg with cfg.cnn's model and optimizer settings."""
    c = cfg.cnn
    return config.derive(cfg, {"model": c.model, "optimizer.lr": c.lr,
                               "optimizer.schedule": c.schedule,
                               "optimizer.weight_decay": c.weight_decay,
                               "train.steps_per_call": c.steps_per_call})


def fit_model(name: str, cfg, workdir: pathlib.Path, data) -> tuple:
    """Trains the ViT ("vit") or the CNN ("cnn") on data; (params, metrics row)."""
    k = num_classes_of(data)
    if name == "vit":
        run_cfg, model = cfg, ViTClassifier(vit_model_config(cfg, data))
    else:
        run_cfg = cnn_run(cfg)
        model_cfg = ClassifierConfig(**run_cfg.model.to_dict(), num_classes=k)
        model = build_classifier(dataclasses.replace(model_cfg, stages=tuple(model_cfg.stages)))
    state, m = task_lib.fit(model, run_cfg, workdir, data, k)
    row = {"model": name, "test_accuracy": m["test_accuracy"], "val_accuracy": m["val_accuracy"],
           "test_loss": m["test_loss"], "params": count_params(state.params),
           "step_ms": 1000.0 / m["steps_per_second"], "steps": m["steps"]}
    return state.params, row


def attention_figure(cfg, data, params, path: pathlib.Path) -> pathlib.Path:
    """Class-token attention per layer and the rollout, for the first test images; `params`
    are the ViTClassifier's."""
    model_cfg = vit_model_config(cfg, data)
    n, g = cfg.figures.examples, model_cfg.grid
    images, labels = data["test"]["image"][:n], data["test"]["label"][:n]
    predictions = np.asarray(ViTClassifier(model_cfg).apply({"params": params}, images)
                             .argmax(-1))
    maps = attention_maps(model_cfg, params["vit"], images)
    if model_cfg.pool == "cls":
        per_layer = plots.class_token_attention(maps, g)
    else:  # no class token: the attention each patch receives, averaged over queries
        per_layer = np.asarray(maps).mean((2, 3)).reshape(maps.shape[0], n, g, g)
    rollout = np.asarray(attention_rollout(maps))
    rollout = (rollout[:, 0, 1:] if model_cfg.pool == "cls" else rollout.mean(1))
    return plots.plot_attention(images, per_layer, rollout.reshape(n, g, g), labels,
                                predictions, path, f"ViT attention on {cfg.data.name} test images")


def run_vit(cfg, workdir: pathlib.Path) -> dict:
    """ViT on the digits: test accuracy, parameters, step time, attention-map figure."""
    data = task_lib.splits(cfg)
    params, row = fit_model("vit", cfg, workdir, data)
    attention_figure(cfg, data, params, workdir / "attention.png")
    write_results(workdir, "Chapter 5: ViT on " + cfg.data.name,
                  [("model", markdown_table([row], list(row)))])
    return {"vit_test_accuracy": row["test_accuracy"], "vit_val_accuracy": row["val_accuracy"],
            "vit_test_loss": row["test_loss"], "vit_params": row["params"],
            "vit_step_ms": row["step_ms"]}


def subset(split: dict, fraction: float, seed: int) -> dict:
    """The first round(fraction * n) examples of a fixed shuffle of a split."""
    if not 0.0 < fraction <= 1.0:
        raise UserError(f"compare.fractions entries must be in (0, 1], got {fraction}")
    n = len(split["label"])
    keep = np.sort(np.random.default_rng(seed).permutation(n)[:max(1, round(fraction * n))])
    return {k: v[keep] for k, v in split.items()}


def run_vit_vs_cnn(cfg, workdir: pathlib.Path) -> dict:
    """ViT vs chapter 2's ResNet: same data, steps and batch, at each training fraction."""
    data = task_lib.splits(cfg)
    fractions = sorted(cfg.compare.fractions)
    rows, vit_params = [], None
    for fraction in fractions:
        part = {**data, "train": subset(data["train"], fraction, cfg.train.seed)}
        if len(part["train"]["label"]) < cfg.train.batch_size:
            raise UserError(f"{fraction:.0%} of the training split is "
                            f"{len(part['train']['label'])} examples, fewer than "
                            f"train.batch_size={cfg.train.batch_size}")
        for name in ("vit", "cnn"):
            pct = f"{round(fraction * 100)}pct"
            print(f"--- {name} on {pct} of the training split", flush=True)
            params, row = fit_model(name, cfg, workdir / f"{name}-{pct}", part)
            rows.append({**row, "fraction": fraction, "train_examples": len(part["train"]["label"])})
            if name == "vit" and fraction == fractions[-1]:
                vit_params = params
    full = {r["model"]: r for r in rows if r["fraction"] == fractions[-1]}
    attention_figure(cfg, data, vit_params, workdir / "attention.png")
    plots.plot_fractions(rows, workdir / "data_fraction.png",
                         f"ViT vs ResNet on {cfg.data.name}, {cfg.train.steps} steps each")
    columns = ["model", "fraction", "train_examples", "test_accuracy", "val_accuracy",
               "params", "step_ms"]
    write_results(workdir, "Chapter 5: ViT vs CNN", [("runs", markdown_table(rows, columns))])
    metrics = {"vit_test_accuracy": full["vit"]["test_accuracy"],
               "cnn_test_accuracy": full["cnn"]["test_accuracy"],
               "vit_params": full["vit"]["params"], "cnn_params": full["cnn"]["params"],
               "vit_step_ms": full["vit"]["step_ms"], "cnn_step_ms": full["cnn"]["step_ms"]}
    for r in rows:
        group = f"{r['model']}_{round(r['fraction'] * 100)}pct"
        metrics.update({f"{group}/test_accuracy": r["test_accuracy"],
                        f"{group}/step_ms": r["step_ms"]})
    return metrics


EXPERIMENTS = {"vit": run_vit, "vit_vs_cnn": run_vit_vs_cnn}


def main(argv=None):
    return cli.run_chapter("ch5", EXPERIMENTS, default_config="ch5_vit", argv=argv)


if __name__ == "__main__":
    main()
