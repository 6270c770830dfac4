"""Chapter 5's VQA lab: a tiny vision-language model by early fusion against late fusion on
frozen CLIP features, on templated questions about the generated scenes (data/scenes.py).

    1. CLIP on the scenes' caption pairs (clip_lab.train_clip, the one loop).
    2. Early fusion (models/vlm.py): the CLIP image tower's patch tokens, projected, are the
       prefix of chapter 4's GPT; question + answer rows, answer-only loss, the one loop.
       The image tower stays frozen unless vlm.train_vit.
    3. Late fusion: the frozen CLIP image embedding and the CLIP text embedding of the
       question, [img, txt, img * txt] -> an MLP over every answer (FeatureHead kind="mlp").
    4. Exact match of the generated (early) or chosen (late) answer on the questions about
       the held-out scenes (held-out colour x shape pairs) and about the seen test scenes,
       per question kind; a grid of held-out examples with question, answer and truth.
"""
from __future__ import annotations

import pathlib

import numpy as np

from jaxcourse import config
from jaxcourse.data import pipeline, scenes
from jaxcourse.errors import ConfigError
from jaxcourse.models import clip as clip_lib
from jaxcourse.models import vlm as vlm_lib
from jaxcourse.models.transformer import gpt_config
from jaxcourse.models.vit import vit_config
from jaxcourse.report import markdown_table, write_results
from jaxcourse.train import evaluate, train
from jaxcourse.train.step import make_eval_fn
from jaxcourse.vision import clip_lab, plots
from jaxcourse.vision import task as task_lib

SPLITS = ("heldout", "test")  # evaluated: held-out pairs, seen pairs


def vlm_model(cfg, tok) -> vlm_lib.VLM:
    """The VLM of cfg: the CLIP image tower's ViT (cfg.model) up to block vlm.vit_layers,
    cfg.gpt with the tokenizer's vocabulary and a context of the image's tokens plus
    vlm.text_context."""
    layers = cfg.vlm.vit_layers or cfg.model.n_layer
    if not 0 < layers <= cfg.model.n_layer:
        raise ConfigError(f"vlm.vit_layers={cfg.vlm.vit_layers} is not in 0..model.n_layer="
                          f"{cfg.model.n_layer}")
    vit = vit_config(cfg.model, image_size=scenes.IMAGE_SIZE, channels=3, num_classes=0,
                     n_layer=layers)
    gpt = gpt_config(cfg.gpt, vocab_size=tok.vocab_size,
                     context=vit.n_tokens + cfg.vlm.text_context)
    return vlm_lib.VLM(vlm_lib.VLMConfig(vit=vit, gpt=gpt, projector=cfg.vlm.projector))


def image_tower(clip_params, n_layer: int) -> dict:
    """The CLIP image tower's parameters up to block n_layer (its final norm kept): the
    VLM reads the tokens there, as LLaVA reads CLIP's penultimate layer, since the last
    blocks of a contrastive tower pool the image into one embedding and localise less."""
    enc = clip_params["encoder"]
    blocks = {k: v for k, v in enc["encoder"]["blocks"].items()
              if int(k.split("_")[-1]) < n_layer}
    return {**enc, "encoder": {**enc["encoder"], "blocks": blocks}}


def qa_rows(split: scenes.Scenes, qa: scenes.QA, tok, context: int) -> dict:
    """The question + answer rows of a split (tokenize_qa), each with its scene's image."""
    return {"image": clip_lab.Rows(split.images, qa.scene),
            **scenes.tokenize_qa(tok, qa.questions, qa.answers, context)}


def answer_strings(tok, new_BxN) -> list[str]:
    """Generated tokens -> answers: everything before the first PAD (the end)."""
    pad = scenes.pad_id(tok)
    out = []
    for row in np.asarray(new_BxN):
        ends = np.flatnonzero(row == pad)
        out.append(tok.decode([int(t) for t in row[:ends[0] if len(ends) else len(row)]]))
    return out


def generator(model, max_new: int):
    """generate(params, rows, batch_size) -> greedy answer tokens [N, max_new] of every row, in
    batches of batch_size (the last one padded); decode.generate compiles once per prompt
    width (the longest question of a batch)."""
    def generate(params, rows: dict, batch_size: int) -> np.ndarray:
        n, out = len(rows["start"]), []
        for i in range(0, n, batch_size):
            idx = np.arange(i, min(i + batch_size, n))
            idx = np.concatenate([idx, np.full(batch_size - len(idx), idx[-1])])
            out.append(np.asarray(vlm_lib.greedy_answers(
                model, params, rows["image"][idx], rows["inputs"][idx], rows["start"][idx],
                max_new)))
        return np.concatenate(out)[:n]

    return generate


def train_vlm(cfg, workdir: pathlib.Path, model: vlm_lib.VLM, rows: dict,
              clip_params) -> tuple:
    """Early fusion with the one loop on the train rows (eval: the test rows), the image
    tower from CLIP; (params, metrics with the teacher-forced exact match on heldout)."""
    v = cfg.vlm
    run = config.derive(cfg, {"train.steps": v.steps, "optimizer.lr": v.lr,
                              "train.batch_size": v.batch_size,
                              "optimizer.warmup_steps": min(v.steps // 10, 100),
                              "optimizer.frozen": "" if v.train_vit else "^vit/",
                              "train.eval_every": v.steps})
    tower = image_tower(clip_params, model.cfg.vit.n_layer)
    task = task_lib.with_pretrained(vlm_lib.vqa_task(model), {"vit": tower})
    keys = ("image", "inputs", "targets", "mask")
    state, m = train(task, run, workdir, pipeline.batches(
        {k: rows["train"][k] for k in keys}, run.train.batch_size, run.train.seed),
        pipeline.eval_batches({k: rows["test"][k] for k in keys}, cfg.eval_batch_size))
    forced = evaluate(make_eval_fn(task, run.train.seed), state.params, state.model_state,
                      pipeline.eval_batches({k: rows["heldout"][k] for k in keys},
                                            cfg.eval_batch_size))
    return state.params, {**m, "heldout_teacher_forced": forced["exact_match"]}


def late_features(img_NxD, txt_MxD, qa: scenes.QA) -> np.ndarray:
    """[img, txt, img * txt] per question: the frozen CLIP embeddings of its scene's image
    and of the question text, [M, 3D]."""
    img = img_NxD[qa.scene]
    return np.concatenate([img, txt_MxD, img * txt_MxD], axis=1)


def accuracies(pred: list[str], qa: scenes.QA) -> dict:
    """Exact match overall ("all") and per question kind."""
    hit = np.array([p == a for p, a in zip(pred, qa.answers)])
    out = {"all": float(hit.mean())}
    for i, kind in enumerate(scenes.QUESTION_KINDS):
        if (qa.kind == i).any():
            out[kind] = float(hit[qa.kind == i].mean())
    return out


def figure_rows(qa: scenes.QA, n: int) -> list[int]:
    """n questions for the grid: the question kinds in turn, each about another scene."""
    queues = [list(np.flatnonzero(qa.kind == k)) for k in range(len(scenes.QUESTION_KINDS))]
    picked, used = [], set()
    while len(picked) < n and any(queues):
        for q in queues:
            while q and qa.scene[q[0]] in used:
                q.pop(0)
            if q and len(picked) < n:
                picked.append(int(q.pop(0)))
                used.add(qa.scene[picked[-1]])
    return picked


def run_vqa(cfg, workdir: pathlib.Path) -> dict:
    """Early-fusion VLM (CLIP ViT tokens as GPT prefix) vs late fusion on frozen CLIP
    features: VQA exact match on the held-out pairs' scenes; the example grid."""
    s = cfg.scenes
    data = scenes.make_splits(s.n_train, s.n_test, s.n_heldout, s.seed)
    qa = {k: scenes.make_qa(data[k]) for k in data}
    tok = scenes.caption_tokenizer()
    # every question is checked against both text contexts before anything trains
    model = vlm_model(cfg, tok)
    rows = {k: qa_rows(data[k], qa[k], tok, cfg.vlm.text_context) for k in ("train", *SPLITS)}
    scenes.tokenize_captions(tok, [q for k in rows for q in qa[k].questions],
                             cfg.clip.text_context)  # late fusion's CLIP text tower
    print("--- CLIP on the caption pairs (the frozen features of both models)", flush=True)
    clip_model, clip_params, cm = clip_lab.train_clip(cfg, workdir / "clip", data, tok)
    print("--- early fusion: CLIP patch tokens as the GPT's prefix", flush=True)
    params, vm = train_vlm(cfg, workdir / "vlm", model, rows, clip_params)
    max_new = max(len(tok.encode(a)) for a in scenes.answer_vocabulary()) + 1
    generate = generator(model, max_new)
    early = {k: answer_strings(tok, generate(params, rows[k], cfg.eval_batch_size))
             for k in SPLITS}
    print("--- late fusion: an MLP on frozen CLIP image and question embeddings", flush=True)
    vocab = scenes.answer_vocabulary()
    parts = ("train", *SPLITS)
    img = clip_lab.embed_images(clip_model, clip_params, {k: data[k].images for k in parts},
                                cfg.eval_batch_size)
    txt = clip_lab.embed_texts(clip_model, clip_params, tok,
                               {k: list(qa[k].questions) for k in parts},
                               cfg.clip.text_context, cfg.eval_batch_size)
    feats = {k: late_features(img[k], txt[k], qa[k]) for k in parts}
    head = clip_lib.FeatureHead(len(vocab), "mlp", hidden=cfg.late.hidden)
    late_params, lm = clip_lab.fit_head(
        head, feats["train"], [vocab.index(a) for a in qa["train"].answers],
        clip_lab.head_run(cfg, cfg.late), workdir / "late_fusion")
    late = {k: [vocab[int(i)] for i in np.asarray(
        head.apply({"params": late_params}, feats[k])).argmax(-1)] for k in SPLITS}
    acc = {(name, k): accuracies(pred[k], qa[k]) for name, pred in (("early", early),
                                                                   ("late", late))
           for k in SPLITS}
    pick = figure_rows(qa["heldout"], cfg.figures.examples)
    h = qa["heldout"]
    plots.plot_vqa(data["heldout"].images[h.scene[pick]], [h.questions[i] for i in pick],
                   [early["heldout"][i] for i in pick], [h.answers[i] for i in pick],
                   workdir / "vqa_samples.png",
                   "Early-fusion VLM on held-out-pair scenes (generated answers)")
    kinds = ["all", *scenes.QUESTION_KINDS]
    table = [{"model": name, "questions": k, **{c: acc[(m, k)].get(c, float("nan"))
                                                for c in kinds}}
             for m, name in (("early", "early fusion (VLM)"), ("late", "late fusion (MLP)"))
             for k in SPLITS]
    write_results(workdir, "Chapter 5: VQA on the generated scenes", [
        ("exact match (heldout: held-out pairs' scenes; test: seen pairs)",
         markdown_table(table, ["model", "questions", *kinds])),
        ("questions", markdown_table([{"split": k, "questions": len(qa[k]), "scenes": len(data[k])}
                                      for k in ("train", *SPLITS)],
                                     ["split", "questions", "scenes"]))])
    out = {"vqa_accuracy": acc[("early", "heldout")]["all"],
           "vqa_late_fusion_accuracy": acc[("late", "heldout")]["all"],
           "vqa_seen_accuracy": acc[("early", "test")]["all"],
           "vqa_late_fusion_seen_accuracy": acc[("late", "test")]["all"],
           "vqa_teacher_forced_accuracy": vm["heldout_teacher_forced"],
           "vqa_train_loss": vm["train/loss"], "vqa_steps": vm["steps"],
           "vqa_late_fusion_train_loss": lm["train/loss"],
           "vqa_clip_steps": cm["steps"], "vqa_train_questions": len(qa["train"]),
           "vqa_heldout_questions": len(qa["heldout"])}
    for kind in scenes.QUESTION_KINDS:
        for m, prefix in (("early", "vqa"), ("late", "vqa_late_fusion")):
            if kind in acc[(m, "heldout")]:
                out[f"{prefix}_{kind}_accuracy"] = acc[(m, "heldout")][kind]
    return out
