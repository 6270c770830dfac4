"""Chapter 5's self-supervised labs on the digits: MAE and DINO pretraining of the ViT with the
one loop, then what the encoder learned, measured with labels it never saw.

    run_mae:  MAE pretraining on every training image (no labels) -> reconstructions figure;
              a linear probe (encoder frozen) and fine-tuning; the mini-survey MAE-pretrain +
              fine-tune vs supervised from scratch at label fractions (same steps for both).
    run_dino: DINO pretraining (multi-crop, EMA teacher, centering) -> weighted k-NN and a
              linear probe of the teacher's encoder vs a random-init encoder of the same
              architecture; the collapse monitor (teacher entropy, KL) over training.
"""
from __future__ import annotations

import json
import math
import pathlib

import flax.linen as nn
import jax
import numpy as np

from jaxcourse import config
from jaxcourse.data import pipeline
from jaxcourse.errors import UserError
from jaxcourse.models.vit import ViT, ViTClassifier, vit_config
from jaxcourse.report import markdown_table, write_results
from jaxcourse.train import train
from jaxcourse.vision import dino as dino_lib
from jaxcourse.vision import mae as mae_lib
from jaxcourse.vision import plots
from jaxcourse.vision import task as task_lib


def _encoder_config(cfg, data):
    _, h, w, c = data["train"]["image"].shape
    if h != w:
        raise UserError(f"the ViT takes square images, got {h}x{w}")
    return vit_config(cfg.model, image_size=h, channels=c,
                      num_classes=int(data["train"]["label"].max()) + 1)


def classify(cfg, workdir: pathlib.Path, data: dict, pretrained: dict | None = None,
             probe: bool = False) -> dict:
    """One ViTClassifier run of the shared loop: from scratch, fine-tuned from `pretrained`
    ({"vit": encoder params}) or, with `probe`, a linear probe (the encoder frozen, the probe
    section's steps and learning rate). The batch shrinks to the split when it is smaller."""
    changes = {"train.batch_size": min(cfg.train.batch_size, len(data["train"]["label"]))}
    if probe:
        changes.update({"optimizer.frozen": "^vit/", "optimizer.lr": cfg.probe.lr,
                        "optimizer.weight_decay": 0.0, "train.steps": cfg.probe.steps,
                        "train.eval_every": cfg.probe.steps})
    run_cfg = config.derive(cfg, changes)
    model_cfg = _encoder_config(cfg, data)
    _, m = task_lib.fit(ViTClassifier(model_cfg), run_cfg, workdir, data, model_cfg.num_classes,
                        pretrained)
    return {"test_accuracy": m["test_accuracy"], "val_accuracy": m["val_accuracy"],
            "steps": m["steps"], "step_ms": 1000.0 / m["steps_per_second"]}


def pretrain(task, cfg, workdir: pathlib.Path, images: np.ndarray, steps: int, lr: float,
             batch_size: int = 0, warmup_steps: int = 0):
    """Self-supervised pretraining: the shared loop on {"image"} batches, no labels, no eval:
    (state, metrics with the batch_size and warmup_steps it ran with). batch_size and
    warmup_steps 0 keep the train and optimizer sections' values."""
    changes = {"train.steps": steps, "optimizer.lr": lr, "train.eval_every": 0}
    if batch_size:
        changes["train.batch_size"] = batch_size
    if warmup_steps:
        changes["optimizer.warmup_steps"] = warmup_steps
    run_cfg = config.derive(cfg, changes)
    state, metrics = train(task, run_cfg, workdir, pipeline.batches(
        {"image": images}, run_cfg.train.batch_size, run_cfg.train.seed))
    return state, {**metrics, "batch_size": run_cfg.train.batch_size,
                   "warmup_steps": run_cfg.optimizer.warmup_steps}


def metric_rows(workdir: pathlib.Path) -> list[dict]:
    path = workdir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------- MAE
def mae_model(cfg, data) -> mae_lib.MAE:
    enc = _encoder_config(cfg, data)
    m = cfg.mae
    mae_cfg = mae_lib.MAEConfig(patch_size=enc.patch_size, mask_ratio=m.mask_ratio,
                                norm_pix=m.norm_pix, decoder_d_model=m.decoder_d_model,
                                decoder_layers=m.decoder_layers, decoder_heads=m.decoder_heads,
                                dtype=enc.dtype)
    return mae_lib.MAE(ViT(enc), mae_cfg)


def reconstructions(model: mae_lib.MAE, params, images, seed: int) -> dict:
    b, h, w, _ = images.shape
    p = model.cfg.patch_size
    m = mae_lib.random_masking(jax.random.key(seed), b, (h // p) * (w // p), model.cfg.mask_ratio)
    pred = model.apply({"params": params}, images, m["keep"], m["restore"])
    return jax.tree.map(np.asarray,
                        mae_lib.reconstruction(images, pred, m["mask"], model.cfg))


def run_mae(cfg, workdir: pathlib.Path) -> dict:
    """MAE pretraining, then fine-tune vs from scratch at each label fraction, and a linear probe."""
    data = task_lib.splits(cfg)
    model = mae_model(cfg, data)
    print("--- MAE pretraining on every training image (no labels)", flush=True)
    m = cfg.mae
    state, pm = pretrain(mae_lib.mae_task(model), cfg, workdir / "pretrain",
                         data["train"]["image"], m.pretrain_steps, m.pretrain_lr,
                         m.pretrain_batch_size, m.pretrain_warmup_steps)
    images = data["test"]["image"][:cfg.figures.examples]
    rec = reconstructions(model, state.params, images, cfg.train.seed)
    plots.plot_reconstructions(images, rec["masked"], rec["pasted"],
                               workdir / "mae_reconstructions.png",
                               f"MAE on {cfg.data.name} test images, "
                               f"{cfg.mae.mask_ratio:.0%} of patches hidden")
    encoder = {"vit": state.params["encoder"]}
    print("--- linear probe of the MAE encoder", flush=True)
    probe = classify(cfg, workdir / "probe", data, encoder, probe=True)
    rows = []
    for fraction in sorted(cfg.survey.fractions):
        part = {**data, "train": task_lib.subset(data["train"], fraction, cfg.train.seed,
                                                  "survey.fractions")}
        pct = f"{fraction * 100:g}pct"
        for init, pre in (("mae", encoder), ("scratch", None)):
            print(f"--- {init} on {pct} of the labels", flush=True)
            r = classify(cfg, workdir / f"{init}-{pct}", part, pre)
            rows.append({"init": init, "fraction": fraction,
                         "labelled_examples": len(part["train"]["label"]), **r})
    names = {"mae": "MAE pretrain + fine-tune", "scratch": "supervised from scratch"}
    plots.plot_fractions([{**r, "model": names[r["init"]]} for r in rows],
                         workdir / "label_fraction.png",
                         f"MAE vs scratch on {cfg.data.name}, {cfg.train.steps} steps each",
                         xlabel="labelled training examples (% of the training split)",
                         log_x=True)
    columns = ["init", "fraction", "labelled_examples", "test_accuracy", "val_accuracy",
               "steps", "step_ms"]
    write_results(workdir, "Chapter 5: MAE on " + cfg.data.name, [
        ("pretraining", markdown_table([{**pm, "mae_loss": pm["train/loss"]}],
                                       ["steps", "batch_size", "warmup_steps", "mae_loss"])),
        ("linear probe (encoder frozen, all labels)",
         markdown_table([probe], ["test_accuracy", "val_accuracy", "steps"])),
        ("label-fraction survey", markdown_table(rows, columns))])
    by = {(r["init"], r["fraction"]): r["test_accuracy"] for r in rows}
    at = 0.1 if 0.1 in cfg.survey.fractions else sorted(cfg.survey.fractions)[0]
    out = {"mae_finetune_accuracy": by[("mae", at)], "scratch_accuracy": by[("scratch", at)],
           "mae_label_fraction": at, "mae_linear_probe_accuracy": probe["test_accuracy"],
           "mae_pretrain_loss": pm["train/loss"], "mae_pretrain_steps": pm["steps"],
           "mae_pretrain_batch_size": pm["batch_size"],
           "mae_pretrain_step_ms": 1000.0 / pm["steps_per_second"]}
    for (init, fraction), acc in by.items():
        out[f"{init}_{fraction * 100:g}pct/test_accuracy"] = acc
    return out


# ---------------------------------------------------------------- DINO
def dino_model(cfg, data) -> dino_lib.DINO:
    enc = _encoder_config(cfg, data)
    d = cfg.dino.to_dict()
    d = {**d, "global_scale": tuple(d["global_scale"]), "local_scale": tuple(d["local_scale"]),
         "global_size": enc.image_size, "total_steps": cfg.train.steps}
    return dino_lib.DINO(ViT(enc), dino_lib.DINOConfig(**d))


def batched(fn, params, images: np.ndarray, batch_size: int) -> np.ndarray:
    """fn(params, x) over images in batches of batch_size, the last one zero-padded and cut
    back, so that a jitted fn compiles one shape however many images there are."""
    out = []
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size]
        pad = batch_size - len(x)
        if pad:
            x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)])
        out.append(np.asarray(fn(params, x))[:batch_size - pad])
    return np.concatenate(out)


def knn(model, params, cfg, data, encode=None) -> float:
    """Weighted k-NN accuracy of the encoder's features; `encode` (a jitted
    (params, images) -> features) is shared between calls so that it compiles once."""
    if encode is None:
        encode = jax.jit(lambda p, x: model.apply({"params": p}, x, features_only=True))
    bs = min(cfg.eval_batch_size, len(data["train"]["label"]))
    f = {k: batched(encode, params, data[k]["image"], bs) for k in ("train", "test")}
    k = int(data["train"]["label"].max()) + 1
    return dino_lib.knn_accuracy(f["train"], data["train"]["label"], f["test"],
                                 data["test"]["label"], k, cfg.knn.k, cfg.knn.temperature)


def run_dino(cfg, workdir: pathlib.Path) -> dict:
    """DINO self-distillation with its collapse monitor, then a k-NN and linear probe."""
    data = task_lib.splits(cfg)
    model = dino_model(cfg, data)
    print("--- DINO pretraining on every training image (no labels)", flush=True)
    state, pm = pretrain(dino_lib.dino_task(model), cfg, workdir / "pretrain",
                         data["train"]["image"], cfg.train.steps, cfg.optimizer.lr)
    teacher = state.model_state["teacher"]
    image = np.zeros((1, *data["train"]["image"].shape[1:]), np.float32)
    random = nn.meta.unbox(model.init(jax.random.key(cfg.train.seed + 1), image)["params"])
    rows = []
    encode = jax.jit(lambda p, x: model.apply({"params": p}, x, features_only=True))
    for name, params in (("dino", teacher), ("random", random)):
        print(f"--- k-NN and linear probe of the {name} encoder", flush=True)
        probe = classify(cfg, workdir / f"probe-{name}", data, {"vit": params["encoder"]},
                         probe=True)
        rows.append({"encoder": name, "knn_accuracy": knn(model, params, cfg, data, encode),
                     "linear_probe_accuracy": probe["test_accuracy"]})
    monitor = [r for r in metric_rows(workdir / "pretrain") if "train/teacher_entropy" in r]
    plots.plot_collapse(monitor, math.log(cfg.dino.out_dim), workdir / "dino_collapse.png",
                        f"DINO collapse monitor on {cfg.data.name}")
    write_results(workdir, "Chapter 5: DINO on " + cfg.data.name, [
        ("frozen encoders (k-NN: k={}, T={})".format(cfg.knn.k, cfg.knn.temperature),
         markdown_table(rows, list(rows[0])))])
    by = {r["encoder"]: r for r in rows}
    last = monitor[-1]
    return {"dino_knn_accuracy": by["dino"]["knn_accuracy"],
            "random_knn_accuracy": by["random"]["knn_accuracy"],
            "dino_linear_probe_accuracy": by["dino"]["linear_probe_accuracy"],
            "random_linear_probe_accuracy": by["random"]["linear_probe_accuracy"],
            "dino_teacher_entropy": last["train/teacher_entropy"],
            "dino_batch_entropy": last["train/batch_entropy"], "dino_kl": last["train/kl"],
            "dino_steps": pm["steps"], "dino_step_ms": 1000.0 / pm["steps_per_second"]}
