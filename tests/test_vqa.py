"""VQA: the scene question generator (answers true of constructed and drawn scenes, held-out
pairs absent from training), the answer-only rows and loss, greedy decoding, the long-question
error, and the few-shot heads on separable features. (The smoke run of the lab is in
tests/test_ch5.py's one chapter run.)"""
import types

import jax
import numpy as np
import pytest

from jaxcourse.data import scenes
from jaxcourse.errors import ConfigError
from jaxcourse.models import vlm as V
from jaxcourse.models.transformer import GPTConfig
from jaxcourse.models.vit import ViTConfig
from jaxcourse.vision import clip_lab
from jaxcourse.vision.configs import clip_config

RED, BLUE, SQUARE, CIRCLE = 0, 2, 0, 1


def test_questions_of_a_constructed_scene():
    # two red squares left of a blue circle
    got = scenes.questions_for(RED, SQUARE, 0, 2, BLUE, CIRCLE, 0)
    assert got == [
        ("count", "how many red squares?", "two"),
        ("colour", "what colour are the squares?", "red"),
        ("shape", "what shape are the red ones?", "square"),
        ("count", "how many blue circles?", "one"),
        ("colour", "what colour is the circle?", "blue"),
        ("shape", "what shape is the blue one?", "circle"),
        ("relation", "what is left of the blue circle?", "red square"),
        ("relation", "what is right of the red squares?", "blue circle"),
        ("side", "where are the red squares?", "left"),
        ("side", "where is the blue circle?", "right")]
    # a red square right of a blue square: "what colour is the square?" has no one answer
    got = scenes.questions_for(RED, SQUARE, 1, 1, BLUE, SQUARE, 1)
    assert [k for k, _, _ in got].count("colour") == 0
    assert ("side", "where is the red square?", "right") in got
    alone = scenes.questions_for(BLUE, CIRCLE, 0, 3, -1, -1, -1)
    assert [q for _, q, _ in alone] == ["how many blue circles?", "what colour are the circles?",
                                        "what shape are the blue ones?"]
    assert all(a in scenes.answer_vocabulary() for _, _, a in got + alone)


def _mean_x(image, colour):
    near = np.abs(image - scenes.RGB[colour]).max(-1) < 0.2
    return np.flatnonzero(near.any(0)).mean()


def test_answers_are_true_of_the_drawn_scenes_and_heldout_pairs_stay_out_of_training():
    split = scenes.generate(120, seed=3, split="train")
    qa = scenes.make_qa(split)
    assert len(qa) > 4 * len(split)
    sides = 0
    for i in np.flatnonzero(qa.kind == scenes.QUESTION_KINDS.index("side")):
        s = qa.scene[i]
        k, k2 = split.colour[s], split.other_colour[s]
        if k == k2:
            continue
        asked = k if scenes.COLOURS[k] in qa.questions[i] else k2
        other = k2 if asked == k else k
        left = _mean_x(split.images[s], asked) < _mean_x(split.images[s], other)
        assert qa.answers[i] == ("left" if left else "right"), qa.questions[i]
        sides += 1
    assert sides > 50
    for i in np.flatnonzero(qa.kind == scenes.QUESTION_KINDS.index("count")):
        s = qa.scene[i]  # "how many" asks about the group (its count) or the other object
        group = f"{scenes.COLOURS[split.colour[s]]} {scenes.SHAPES[split.shape[s]]}s?"
        want = split.count[s] if qa.questions[i].endswith(group) else 1
        assert qa.answers[i] == scenes.COUNT_WORDS[want - 1]
    held = [f"{c} {s}" for c, s in scenes.HELDOUT_PAIRS]
    text = " | ".join(qa.questions + qa.answers)
    assert not any(h in text for h in held)
    heldout_text = " | ".join(scenes.make_qa(scenes.generate(40, seed=3, split="heldout"))
                              .answers)
    assert any(h in heldout_text for h in held)  # ...while the heldout split asks about them


def test_rows_mask_the_answer_only_and_long_questions_are_refused():
    tok = scenes.caption_tokenizer()
    rows = scenes.tokenize_qa(tok, ["how many red squares?", "where is it?"], ["two", "left"], 30)
    q = len("how many red squares? ")
    assert rows["start"].tolist() == [q, len("where is it? ")]
    assert tok.decode(rows["inputs"][0, :q + 3].tolist()) == "how many red squares? two"
    # the mask covers the answer's targets and the end (PAD) after it, nothing else
    assert np.flatnonzero(rows["mask"][0]).tolist() == list(range(q - 1, q + 3))
    assert tok.decode(rows["targets"][0][rows["mask"][0]].tolist()) == "two" + scenes.PAD
    with pytest.raises(ConfigError, match="question 'how many red squares.' with its answer "
                                          "is 25 tokens, longer than the text context 24"):
        scenes.tokenize_qa(tok, ["how many red squares?"], ["two"], 24)


def _tiny_vlm(vocab: int):
    vit = ViTConfig(image_size=8, channels=3, patch_size=4, pool="gap", n_layer=1, n_head=2,
                    d_model=16, num_classes=0)
    gpt = GPTConfig(vocab_size=vocab, context=4 + 12, n_layer=1, n_head=2, d_model=16)
    return V.VLM(V.VLMConfig(vit=vit, gpt=gpt))


def test_answer_only_loss_and_greedy_decoding():
    tok = scenes.caption_tokenizer()
    model = _tiny_vlm(tok.vocab_size)
    rows = scenes.tokenize_qa(tok, ["many?", "is it?"], ["two", "no"], 12)
    rng = np.random.default_rng(0)
    batch = {"image": rng.uniform(size=(2, 8, 8, 3)).astype(np.float32),
             **{k: rows[k] for k in ("inputs", "targets", "mask")}}
    task = V.vqa_task(model)
    params, _ = jax.jit(task.init)(jax.random.key(0), batch)
    loss = jax.jit(lambda b: task.loss(params, {}, b, jax.random.key(1), False))
    value, (metrics, _) = loss(batch)
    # question targets do not count: changing them leaves the loss; an answer's does not
    junk = {**batch, "targets": np.where(batch["mask"], batch["targets"], 5)}
    np.testing.assert_allclose(loss(junk)[0], value, rtol=1e-6)
    other = {**batch, "targets": np.where(batch["mask"], 7, batch["targets"])}
    assert abs(float(loss(other)[0]) - float(value)) > 1e-3
    # greedy answers are the argmax continuation: fed back as the answer, every one of them
    # is the argmax (the exact-match metric is then 1), whatever the row held after `start`
    def greedy(t):
        return V.greedy_answers(model, params, batch["image"], t, rows["start"], 4)

    new = greedy(batch["inputs"])
    garbage = np.where(np.arange(12)[None] >= rows["start"][:, None], 9, batch["inputs"])
    np.testing.assert_array_equal(greedy(garbage), new)
    seq = np.concatenate([batch["inputs"], np.zeros((2, 1), np.int32)], 1)
    for i, s in enumerate(rows["start"]):
        seq[i, s:s + 4] = new[i]
    mask = np.zeros((2, 12), bool)
    for i, s in enumerate(rows["start"]):
        mask[i, s - 1:s + 3] = True
    fed = {**batch, "inputs": seq[:, :-1], "targets": seq[:, 1:], "mask": mask}
    assert float(loss(fed)[1][0]["exact_match"]) == 1.0
    assert float(metrics["exact_match"]) == 0.0  # a random model does not say "two", "no"


def test_factored_probe_and_adapter_compose_on_separable_features(tmp_path):
    """Colour in 5 dims and shape in 4 (one-hot plus noise): heads trained on the seen pairs
    alone name the held-out pairs, which no training example shows."""
    rng = np.random.default_rng(0)

    def split(labels):
        c, s = labels // len(scenes.SHAPES), labels % len(scenes.SHAPES)
        f = np.concatenate([np.eye(5)[c], np.eye(4)[s]], 1) + 0.1 * rng.normal(size=(len(c), 9))
        return (types.SimpleNamespace(colour=c, shape=s, label=labels),
                (f / np.linalg.norm(f, axis=1, keepdims=True)).astype(np.float32))

    held = scenes.heldout_labels()
    seen = np.setdiff1d(np.arange(20), held)
    parts = {"train": split(rng.choice(seen, 400)), "heldout": split(rng.choice(held, 100)),
             "test": split(rng.choice(seen, 100))}
    data = {k: v[0] for k, v in parts.items()}
    feats = {k: v[1] for k, v in parts.items()}
    pairs = np.arange(20)
    classes = np.concatenate([np.eye(5)[pairs // 4], np.eye(4)[pairs % 4]], 1) / np.sqrt(2)
    cfg = clip_config("smoke")
    cfg.heads.update(steps=100, lr=0.05)
    out = clip_lab.few_shot_heads(cfg, tmp_path, data, feats, classes, scale=10.0)
    for head in ("linear_probe", "adapter"):
        assert out[head]["heldout"] >= 0.95 and out[head]["test"] >= 0.95, out
