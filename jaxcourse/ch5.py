"""Chapter 5: multimodal transformers: ViT, ViT vs CNN, CLIP, MAE, DINO, a tiny VLM (VQA).

    python -m jaxcourse.ch5                                    # every lab below, one summary
    python -m jaxcourse.ch5 --config=configs/ch5_vit.py        # ViT on the embedded digits
    python -m jaxcourse.ch5 --config=configs/ch5_vit_vs_cnn.py # ViT vs chapter 2's ResNet
    python -m jaxcourse.ch5 --config=configs/ch5_clip.py       # CLIP / SigLIP on the scenes
    python -m jaxcourse.ch5 --config=configs/ch5_mae.py        # MAE, probe, label fractions
    python -m jaxcourse.ch5 --config=configs/ch5_dino.py       # DINO, k-NN vs random init
    python -m jaxcourse.ch5 --config=configs/ch5_vqa.py        # early vs late fusion VQA

Lab: a Vision Transformer (models/vit.py: patches as a conv or a reshape, class token or
mean pooling, learned or 2-D sin-cos positions, the shared non-causal block stack) trained
with the one loop and chapter 2's classification task; where its class token looks in each
layer; then chapter 2's ResNet beside a ViT of the same parameter count, on the same data
with the same steps: accuracy, step time, and both at smaller fractions of the training
set. Then CLIP / SigLIP (models/clip.py, vision/contrastive.py) on the generated image-text
scenes (data/scenes.py): the ViT and a text tower trained with the one loop on image-caption
pairs, zero-shot classification of the colour x shape pairs held out of training (prompt
ensembling) against a factored linear probe and CLIP-Adapter on the frozen image embeddings
(vision/clip_lab.py), and text <-> image retrieval R@1/5/10 on the test scenes. Then self-supervised
pretraining of the same ViT on the digits (vision/selfsup.py): MAE with a linear probe,
fine-tuning and MAE vs from scratch at label fractions; DINO with k-NN and a linear probe
against a random-init encoder. Then VQA (vision/vqa.py): the CLIP image tower's patch tokens
as the prefix of chapter 4's GPT (models/vlm.py, early fusion) against an MLP on frozen CLIP
image and question embeddings (late fusion), exact match on questions about held-out pairs.
With no --config, every lab runs and one summary.json merges their metrics (`run_all`).
"""
import dataclasses
import pathlib

import numpy as np

from jaxcourse import cli, config
from jaxcourse.errors import UserError
from jaxcourse.lm.params import count_params
from jaxcourse.data import scenes
from jaxcourse.models import clip as clip_lib
from jaxcourse.models.classifier import ClassifierConfig, build_classifier
from jaxcourse.models.vit import ViTClassifier, attention_maps, attention_rollout, vit_config
from jaxcourse.report import markdown_table, write_results
from jaxcourse.vision import clip_lab, contrastive, plots, selfsup, vqa
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


subset = task_lib.subset  # noqa: E305 (re-exported: the ViT-vs-CNN fractions)


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


def class_embeddings(model, params, cfg, tok) -> np.ndarray:
    """Every colour x shape class by prompt ensembling over cfg.zero_shot.templates: [20, D]."""
    encode = lambda texts: clip_lib.encode_texts(  # noqa: E731
        model, params, tok.encode, texts, cfg.clip.text_context)
    return np.asarray(contrastive.zero_shot_classifier(
        scenes.class_names(), list(cfg.zero_shot.templates), encode))


def zero_shot(img_NxD, classes_KxD, true_N, labels) -> dict:
    """Zero-shot accuracy of images against the candidate classes `labels` only (indices
    into scenes.class_names()); also the predicted labels."""
    labels = np.asarray(labels)
    pred = labels[np.asarray(contrastive.zero_shot_logits(img_NxD, classes_KxD[labels])
                             .argmax(-1))]
    return {"accuracy": float((pred == true_N).mean()), "pred": pred}


def retrieval(model, params, cfg, tok, split: scenes.Scenes, img_NxD) -> tuple:
    """R@1/5/10 both ways over the split's scenes and all their captions; also the
    similarities [images, captions] and the caption pairs."""
    pairs = clip_lab.caption_pairs(split, tok, cfg.clip.text_context)
    txt = clip_lib.encode_texts(model, params, tok.encode, pairs["text"], cfg.clip.text_context)
    sim = img_NxD @ np.asarray(txt).T
    return contrastive.retrieval_recall(sim, pairs["scene"]), sim, pairs


def retrieval_figure(cfg, split: scenes.Scenes, sim, pairs, path: pathlib.Path):
    """The first caption of the first `retrieval.queries` test scenes and their top images."""
    r = cfg.retrieval
    cols = [int(np.flatnonzero(pairs["scene"] == i)[0]) for i in range(r.queries)]
    top = np.argsort(-sim[:, cols].T, axis=1, kind="stable")[:, :r.top]  # [Q, K] scenes
    hits = top == pairs["scene"][cols][:, None]
    return plots.plot_retrieval([pairs["text"][j] for j in cols], split.images[top], hits,
                                path, "CLIP text-to-image retrieval on test scenes")


def run_clip(cfg, workdir: pathlib.Path) -> dict:
    """CLIP / SigLIP on the scenes' train split (the one loop, `contrastive_task`); zero-shot
    on the held-out pairs against a linear probe and an adapter on frozen image embeddings;
    retrieval on the test split; the retrieval grid."""
    s = cfg.scenes
    data = scenes.make_splits(s.n_train, s.n_test, s.n_heldout, s.seed)
    tok = scenes.caption_tokenizer()
    model, params, m = clip_lab.train_clip(cfg, workdir, data, tok)
    heldout, every = scenes.heldout_labels(), np.arange(len(scenes.class_names()))
    classes = class_embeddings(model, params, cfg, tok)
    img = clip_lab.embed_images(model, params, {k: data[k].images
                                                for k in ("train", "heldout", "test")},
                                cfg.eval_batch_size)
    zs = zero_shot(img["heldout"], classes, data["heldout"].label, heldout)
    zs_all = zero_shot(img["heldout"], classes, data["heldout"].label, every)
    zs_seen = zero_shot(img["test"], classes, data["test"].label,
                        np.setdiff1d(every, heldout))
    heads = clip_lab.few_shot_heads(cfg, workdir, data, img, classes,
                                    float(np.exp(params["log_scale"])))
    recall, sim, pairs = retrieval(model, params, cfg, tok, data["test"], img["test"])
    retrieval_figure(cfg, data["test"], sim, pairs, workdir / "retrieval.png")
    zs_rows = [
        {"images": "heldout pairs", "candidates": f"the {len(heldout)} held-out pairs",
         "accuracy": zs["accuracy"]},
        {"images": "heldout pairs", "candidates": "all 20 pairs", "accuracy": zs_all["accuracy"]},
        {"images": "test (seen pairs)", "candidates": "the 16 seen pairs",
         "accuracy": zs_seen["accuracy"]}]
    head_rows = [{"method": "zero-shot (prompt ensembling)", "heldout pairs": zs["accuracy"],
                  "test (seen pairs)": zs_seen["accuracy"]}]
    head_rows += [{"method": name, "heldout pairs": heads[key]["heldout"],
                   "test (seen pairs)": heads[key]["test"]}
                  for key, name in (("linear_probe", "linear probe (colour + shape)"),
                                    ("adapter", "CLIP-Adapter"))]
    r_rows = [{"direction": d, **{f"R@{k}": recall[f"{d}_r{k}"] for k in (1, 5, 10)}}
              for d in ("t2i", "i2t")]
    write_results(workdir, f"Chapter 5: {cfg.clip.loss.upper()} on the generated scenes", [
        ("zero-shot (prompt ensembling)", markdown_table(zs_rows, list(zs_rows[0]))),
        ("few-shot heads on frozen image embeddings vs zero-shot (the held-out pairs among "
         "themselves, the seen pairs among themselves)",
         markdown_table(head_rows, list(head_rows[0]))),
        ("retrieval on the test split", markdown_table(r_rows, list(r_rows[0])))])
    return {"clip_zero_shot_accuracy": zs["accuracy"],
            "clip_linear_probe_accuracy": heads["linear_probe"]["heldout"],
            "clip_adapter_accuracy": heads["adapter"]["heldout"],
            "clip_linear_probe_seen_accuracy": heads["linear_probe"]["test"],
            "clip_adapter_seen_accuracy": heads["adapter"]["test"],
            "clip_zero_shot_all_classes_accuracy": zs_all["accuracy"],
            "clip_zero_shot_seen_accuracy": zs_seen["accuracy"],
            "clip_r_at_1": recall["t2i_r1"],
            **{f"clip_{k}": v for k, v in recall.items()},
            "clip_heldout_labels": sorted(set(int(k) for k in data["heldout"].label)),
            "clip_zero_shot_predicted": sorted(set(int(k) for k in zs["pred"])),
            "clip_test_loss": m["eval/loss"], "clip_scale": m.get("train/scale", float("nan")),
            "clip_steps": m["steps"]}


PARTS = {"vit": run_vit, "vit_vs_cnn": run_vit_vs_cnn, "clip": run_clip,
         "mae": selfsup.run_mae, "dino": selfsup.run_dino, "vqa": vqa.run_vqa}


def run_all(cfg, workdir: pathlib.Path) -> dict:
    """Each part of cfg.parts (a section holding that experiment's config) in
    workdir/<part>; their metrics merged into one dict."""
    parts = [p.strip() for p in cfg.parts.split(",") if p.strip()]
    for name in parts:
        if name not in cfg or cfg[name].get("experiment") not in PARTS:
            raise UserError(f"parts: {name!r} is not a section with an experiment of "
                            f"{', '.join(PARTS)}")
    metrics = {}
    for name in parts:
        print(f"=== {name}", flush=True)
        out = PARTS[cfg[name].experiment](cfg[name], workdir / name)
        clash = set(out) & set(metrics)
        if clash:
            raise UserError(f"parts {name!r} and an earlier one both report {sorted(clash)}")
        metrics.update(out)
    return metrics


EXPERIMENTS = {**PARTS, "all": run_all}


def main(argv=None):
    return cli.run_chapter("ch5", EXPERIMENTS, default_config="ch5_all", argv=argv)


if __name__ == "__main__":
    main()
