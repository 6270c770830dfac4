"""The CLIP pieces chapter 5's CLIP and VQA labs share: the model from the config, training
on the scenes' caption pairs with the one loop, frozen embeddings, and few-shot heads
(models/clip.FeatureHead) trained with the same loop on frozen features.

Few-shot heads against zero-shot, on the held-out colour x shape pairs. No training image
shows a held-out pair, so a probe over the 20 pair labels could never name one. The linear
probe is factored instead: one linear probe for the colour and one for the shape, a pair
scored by log p(colour) + log p(shape). The adapter (CLIP-Adapter) trains on the seen pairs'
text embeddings and scores any candidate pairs' text embeddings at test time, as zero-shot
does.
"""
from __future__ import annotations

import pathlib

import jax
import numpy as np

from jaxcourse import config
from jaxcourse.data import pipeline, scenes
from jaxcourse.models import clip as clip_lib
from jaxcourse.models.vit import ViT, vit_config
from jaxcourse.train import train
from jaxcourse.vision import selfsup


class Rows:
    """rows[idx] of an array, indexed lazily: the images of the flattened caption pairs."""

    def __init__(self, array: np.ndarray, rows: np.ndarray):
        self.array, self.rows = array, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, idx):
        return self.array[self.rows[idx]]


def caption_pairs(split: scenes.Scenes, tok, context: int) -> dict:
    """Every (scene, caption) pair of a split, scene-major: {"image", "tokens", "valid",
    "scene"} (images shared, not copied, between a scene's captions)."""
    texts = [c for caps in split.captions for c in caps]
    owner = np.repeat(np.arange(len(split)), [len(c) for c in split.captions])
    tokens, valid = scenes.tokenize_captions(tok, texts, context)
    return {"image": Rows(split.images, owner), "tokens": tokens, "valid": valid,
            "scene": owner, "text": texts}


def clip_model(cfg, tok) -> clip_lib.CLIP:
    tower = vit_config(cfg.model, image_size=scenes.IMAGE_SIZE, channels=3, num_classes=0)
    return clip_lib.CLIP(ViT(tower), clip_lib.CLIPConfig(**cfg.clip.to_dict(),
                                                         vocab_size=tok.vocab_size,
                                                         dtype=tower.dtype))


def train_clip(cfg, workdir: pathlib.Path, data: dict, tok) -> tuple:
    """CLIP / SigLIP on the caption pairs of data["train"] (eval: data["test"]'s) with the one
    loop; (model, params, metrics)."""
    model = clip_model(cfg, tok)
    pairs = {k: caption_pairs(data[k], tok, cfg.clip.text_context) for k in ("train", "test")}
    keys = ("image", "tokens", "valid")
    state, m = train(clip_lib.contrastive_task(model), cfg, workdir,
                     pipeline.batches({k: pairs["train"][k] for k in keys},
                                      cfg.train.batch_size, cfg.train.seed),
                     pipeline.eval_batches({k: pairs["test"][k] for k in keys},
                                           cfg.eval_batch_size))
    return model, state.params, m


def embed_images(model, params, splits: dict, batch_size: int) -> dict:
    """{name: normalised image embeddings [N, D]} of {name: images}, compiled once."""
    fn = jax.jit(lambda p, x: model.apply({"params": p}, x, method=clip_lib.CLIP.encode_image))
    return {k: selfsup.batched(fn, params, v, batch_size) for k, v in splits.items()}


def embed_texts(model, params, tok, splits: dict, context: int, batch_size: int) -> dict:
    """{name: normalised text embeddings [N, D]} of {name: list of strings}, compiled once;
    a text longer than `context` tokens is a ConfigError (scenes.tokenize_captions)."""
    pad = scenes.pad_id(tok)
    fn = jax.jit(lambda p, t: model.apply({"params": p}, t, t != pad,
                                          method=clip_lib.CLIP.encode_text))
    return {k: selfsup.batched(fn, params, scenes.tokenize_captions(tok, v, context)[0],
                               batch_size) for k, v in splits.items()}


def head_run(cfg, section):
    """The run config of a head on frozen features: `section`'s steps, lr and batch size,
    constant lr, no weight decay, no eval."""
    return config.derive(cfg, {"train.steps": section.steps, "optimizer.lr": section.lr,
                               "train.batch_size": section.batch_size,
                               "optimizer.schedule": "constant", "optimizer.warmup_steps": 0,
                               "optimizer.weight_decay": 0.0, "train.eval_every": 0})


def fit_head(head: clip_lib.FeatureHead, features_NxD, labels_N, run_cfg,
             workdir: pathlib.Path) -> tuple:
    """Trains `head` on frozen features with the one loop (`feature_task`); (params, metrics)."""
    data = {"features": np.asarray(features_NxD, np.float32),
            "label": np.asarray(labels_N, np.int32)}
    state, m = train(clip_lib.feature_task(head), run_cfg, workdir,
                     pipeline.batches(data, min(run_cfg.train.batch_size, len(labels_N)),
                                      run_cfg.train.seed))
    return state.params, m


def few_shot_heads(cfg, workdir: pathlib.Path, data: dict, feats: dict, classes_KxD,
                   scale: float) -> dict:
    """The factored linear probe and the adapter, trained on the frozen image embeddings
    feats["train"] of data["train"] (cfg.heads: steps, lr, batch size, the adapter's ratio
    and hidden width; the adapter's cosine scale is CLIP's learned one); their accuracy on
    the heldout scenes among the held-out pairs and on the test scenes among the seen pairs:
    {"linear_probe": {"heldout": acc, "test": acc}, "adapter": {...}}."""
    h, tr = cfg.heads, data["train"]
    run = head_run(cfg, h)
    heldout = scenes.heldout_labels()
    seen = np.setdiff1d(np.arange(len(scenes.class_names())), heldout)
    n_shapes = len(scenes.SHAPES)
    probes = {}
    for name, labels, k in (("colour", tr.colour, len(scenes.COLOURS)),
                            ("shape", tr.shape, n_shapes)):
        print(f"--- linear probe of the {name} on frozen CLIP image embeddings", flush=True)
        head = clip_lib.FeatureHead(k)
        probes[name] = (head, fit_head(head, feats["train"], labels, run,
                                       workdir / f"probe-{name}")[0])

    def adapter(labels):  # the same parameters score any set of candidate pairs
        return clip_lib.FeatureHead(len(labels), "adapter", classifier_KxD=classes_KxD[labels],
                                    ratio=h.adapter_ratio, hidden=h.adapter_hidden, scale=scale)

    print("--- CLIP-Adapter on frozen CLIP image embeddings (seen pairs)", flush=True)
    adapter_params, _ = fit_head(adapter(seen), feats["train"], np.searchsorted(seen, tr.label),
                                 run, workdir / "adapter")
    out = {"linear_probe": {}, "adapter": {}}
    for split, candidates in (("heldout", heldout), ("test", seen)):
        f, true = feats[split], data[split].label
        lp = {n: np.asarray(jax.nn.log_softmax(head.apply({"params": p}, f))) for n, (head, p) in probes.items()}
        score = lp["colour"][:, candidates // n_shapes] + lp["shape"][:, candidates % n_shapes]
        out["linear_probe"][split] = float((candidates[score.argmax(-1)] == true).mean())
        logits = adapter(candidates).apply({"params": adapter_params}, f)
        out["adapter"][split] = float((candidates[np.asarray(logits).argmax(-1)] == true).mean())
    return out
