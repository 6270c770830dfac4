"""Chapter 5 end to end: the default run (every lab) once on its smoke preset, whose parts ViT vs
CNN (the ViT run inside it), CLIP, MAE, DINO and VQA are checked one by one; one-line bad input."""
import json
import math
import os
import pickle
import pathlib
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from conftest import FAST_COMPILE

from jaxcourse import ch5
from jaxcourse.train import optim
from jaxcourse.data import scenes

SMOKE = "--config=configs/ch5_vit.py:smoke"
REPO = pathlib.Path(__file__).resolve().parents[1]


def _summary(workdir):
    return json.loads((workdir / "summary.json").read_text())["metrics"]


# The smoke run is a dozen small programs, each compiled once and run for a few steps: XLA's
# LLVM optimisation is most of its time (cold, at load 5 on 2 cores: 404 s with it, 2.5x less
# without), so it runs as its own process, on one device, with the backend optimisation off.


@pytest.fixture(scope="module")
def chapter(tmp_path_factory):
    """The default `python -m jaxcourse.ch5` (every lab) on its smoke preset, run once as a
    command: (workdir, merged metrics)."""
    workdir = tmp_path_factory.mktemp("ch5")
    env = {**os.environ, "XLA_FLAGS": FAST_COMPILE}
    subprocess.run([sys.executable, "-m", "jaxcourse.ch5", "--config=configs/ch5_all.py:smoke",
                    f"--workdir={workdir}"], env=env, check=True, cwd=REPO)
    return workdir, _summary(workdir)


def test_default_run_writes_one_summary_of_every_lab(chapter):
    workdir, m = chapter
    for k in ("vit_test_accuracy", "cnn_test_accuracy", "clip_zero_shot_accuracy",
              "clip_r_at_1", "mae_finetune_accuracy", "scratch_accuracy",
              "mae_linear_probe_accuracy", "dino_knn_accuracy", "random_knn_accuracy",
              "clip_linear_probe_accuracy", "clip_adapter_accuracy", "vqa_accuracy",
              "vqa_late_fusion_accuracy"):
        assert 0.0 <= m[k] <= 1.0, k
    for part in ("vit_vs_cnn", "clip", "mae", "dino", "vqa"):  # each part's own results
        assert (workdir / part / "results.md").exists(), part
    with pytest.raises(SystemExit):
        ch5.main(["--config=configs/ch5_all.py:smoke", "--config.parts=mae,nope",
                  f"--workdir={workdir / 'bad'}"])
    assert not (workdir / "bad" / "summary.json").exists()


def test_vit_vs_cnn_trains_both_and_draws(chapter):
    """The ViT and ViT-vs-CNN labs (run_vit is this run's ViT half)."""
    workdir, m = chapter
    workdir = workdir / "vit_vs_cnn"
    rows = [json.loads(line)
            for line in (workdir / "vit-100pct" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert len(losses) == 3 and losses[-1] < losses[0]  # 30 steps: the ViT starts to learn
    for name in ("vit", "cnn"):
        assert 0.0 <= m[f"{name}_test_accuracy"] <= 1.0
        assert m[f"{name}_test_accuracy"] == m[f"{name}_100pct/test_accuracy"]
        assert m[f"{name}_step_ms"] == m[f"{name}_100pct/step_ms"] > 0
    # 16 patches of 2x2x1 into width 32, a class token, 1 block of width 32 (MLP 64; biases),
    # the final norm, a 10-way head
    d, f = 32, 64
    block = 2 * 2 * d + 4 * (d * d + d) + (d * f + f) + (f * d + d)
    assert m["vit_params"] == (4 * d + d) + d + block + 2 * d + (d * 10 + 10) == 9130
    assert m["cnn_params"] == 398  # both models, not one twice
    for png in ("attention.png", "data_fraction.png"):
        assert (workdir / png).stat().st_size > 5_000, png
    table = (workdir / "results.md").read_text()
    for name in ("vit", "cnn"):
        assert f"| {name} | 1 |" in table and f"| {m[name + '_test_accuracy']:.4g} |" in table


def test_clip_zero_shot_on_heldout_pairs_and_retrieval(chapter):
    root, m = chapter
    tmp_path = root / "clip"
    keys = ["clip_zero_shot_accuracy", "clip_zero_shot_all_classes_accuracy",
            "clip_zero_shot_seen_accuracy", "clip_r_at_1", "clip_test_loss"]
    keys += [f"clip_{d}_r{k}" for d in ("t2i", "i2t") for k in (1, 5, 10)]
    for k in keys:
        assert math.isfinite(m[k]), k
    assert m["clip_r_at_1"] == m["clip_t2i_r1"] and m["clip_steps"] == 20
    for d in ("t2i", "i2t"):  # R@k can only grow with k
        assert m[f"clip_{d}_r1"] <= m[f"clip_{d}_r5"] <= m[f"clip_{d}_r10"] <= 1.0
    # the held-out split holds the held-out pairs only, and zero-shot picks among them only
    held = sorted(int(k) for k in scenes.heldout_labels())
    assert m["clip_heldout_labels"] == held
    assert set(m["clip_zero_shot_predicted"]) <= set(held)
    assert (tmp_path / "retrieval.png").stat().st_size > 5_000
    table = (tmp_path / "results.md").read_text()
    assert f"| heldout pairs | the 4 held-out pairs | {m['clip_zero_shot_accuracy']:.4g} |" in table
    assert f"| t2i | {m['clip_t2i_r1']:.4g} |" in table
    # the few-shot heads: trained (20 steps each, on the 128 train scenes), then scored on the
    # 40 heldout and 40 test scenes: accuracies in steps of 1/40
    for head in ("probe-colour", "probe-shape", "adapter"):
        steps = [json.loads(line).get("step") for line in
                 (tmp_path / head / "metrics.jsonl").read_text().splitlines()]
        assert max(s for s in steps if s is not None) == 20, head
    for key in ("clip_linear_probe_accuracy", "clip_adapter_accuracy",
                "clip_linear_probe_seen_accuracy", "clip_adapter_seen_accuracy"):
        assert 0.0 <= m[key] <= 1.0 and float(m[key] * 40).is_integer(), key
    assert (f"| linear probe (colour + shape) | {m['clip_linear_probe_accuracy']:.4g} | "
            f"{m['clip_linear_probe_seen_accuracy']:.4g} |") in table
    assert f"| CLIP-Adapter | {m['clip_adapter_accuracy']:.4g} |" in table


def test_vqa_early_and_late_fusion(chapter):
    root, m = chapter
    workdir = root / "vqa"
    assert m["vqa_clip_steps"] == 10 and m["vqa_steps"] == 10
    n = m["vqa_heldout_questions"]
    for key in ("vqa_accuracy", "vqa_late_fusion_accuracy"):
        assert 0.0 <= m[key] <= 1.0 and abs(m[key] * n - round(m[key] * n)) < 1e-6, key
    # greedy decoding's exact match is teacher forcing's all-answer-tokens-argmax
    assert m["vqa_accuracy"] == pytest.approx(m["vqa_teacher_forced_accuracy"], abs=1e-6)
    for kind in scenes.QUESTION_KINDS:
        assert 0.0 <= m[f"vqa_{kind}_accuracy"] <= 1.0, kind
    table = (workdir / "results.md").read_text()
    assert f"| early fusion (VLM) | heldout | {m['vqa_accuracy']:.4g} |" in table
    assert f"| late fusion (MLP) | heldout | {m['vqa_late_fusion_accuracy']:.4g} |" in table
    assert (workdir / "vqa_samples.png").stat().st_size > 5_000


def test_mae_pretrains_probes_and_surveys_label_fractions(chapter):
    root, m = chapter
    workdir = root / "mae"
    rows = [json.loads(line) for line in
            (workdir / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert m["mae_pretrain_steps"] == 20 and losses[-1] < losses[0]  # the decoder learns
    # pretraining has its own batch size and warmup (the smoke preset's 16 and 4, not the
    # train and optimizer sections' 32 and 2): the logged learning rate, the mean over the
    # steps since the last row, follows warmup 4
    assert m["mae_pretrain_batch_size"] == 16
    lr = [(r["step"], r["train/lr"]) for r in rows if "train/lr" in r]
    for warmup, agrees in ((4, True), (2, False)):
        schedule = optim.make_schedule(ml_collections.ConfigDict(
            {"lr": 3e-3, "warmup_steps": warmup, "schedule": "warmup_cosine",
             "min_lr_ratio": 0.01}), 20)
        start = 0
        for step, logged in lr:
            want = np.mean([schedule(i) for i in range(start, step)])
            assert math.isclose(logged, want, rel_tol=1e-4) == agrees, (warmup, step)
            start = step
    # the smoke survey is the 10% fraction: both inits, same steps; the summary's keys are it
    assert m["mae_label_fraction"] == 0.1
    assert m["mae_finetune_accuracy"] == m["mae_10pct/test_accuracy"]
    assert m["scratch_accuracy"] == m["scratch_10pct/test_accuracy"]
    for init in ("mae", "scratch"):
        steps = [json.loads(line).get("step") for line in
                 (workdir / f"{init}-10pct" / "metrics.jsonl").read_text().splitlines()]
        assert max(s for s in steps if s is not None) == 10
    table = (workdir / "results.md").read_text()
    assert f"| mae | 0.1 | 130 | {m['mae_finetune_accuracy']:.4g} |" in table
    for png in ("mae_reconstructions.png", "label_fraction.png"):
        assert (workdir / png).stat().st_size > 5_000, png


def test_dino_knn_against_random_init_and_collapse_monitor(chapter):
    root, m = chapter
    workdir = root / "dino"
    assert m["dino_steps"] == 20
    assert 0.0 < m["dino_teacher_entropy"] <= math.log(32) + 1e-4  # smoke: K = 32
    # Entropy is concave: the batch-mean distribution is at least as uncertain as the mean
    # image's (a monitor that mixed the two up, or averaged logits, would break this).
    assert m["dino_teacher_entropy"] - 1e-4 <= m["dino_batch_entropy"] <= math.log(32) + 1e-4
    # Student and teacher differ (other crops, temperatures): a zero KL means they were one.
    assert 1e-6 < m["dino_kl"] < 50.0
    assert m["dino_knn_accuracy"] != m["random_knn_accuracy"]  # two different encoders
    table = (workdir / "results.md").read_text()
    assert f"| dino | {m['dino_knn_accuracy']:.4g} |" in table
    assert f"| random | {m['random_knn_accuracy']:.4g} |" in table
    assert (workdir / "dino_collapse.png").stat().st_size > 5_000


def test_zero_shot_scores_only_the_candidate_classes():
    classes = np.eye(4, dtype=np.float32)           # class k's embedding is axis k
    img = np.eye(4, dtype=np.float32)[[0, 1, 2, 3]]  # image i looks like class i
    out = ch5.zero_shot(img, classes, np.array([0, 1, 2, 3]), [1, 3])
    assert set(out["pred"]) <= {1, 3} and out["accuracy"] == 0.5
    assert ch5.zero_shot(img, classes, np.arange(4), np.arange(4))["accuracy"] == 1.0


def test_subset_keeps_a_fixed_fraction():
    split = {"image": np.arange(100)[:, None], "label": np.arange(100)}
    half = ch5.subset(split, 0.5, seed=0)
    assert len(half["label"]) == 50 and np.array_equal(half["image"][:, 0], half["label"])
    assert np.array_equal(ch5.subset(split, 0.5, seed=0)["label"], half["label"])
    quarter = ch5.subset(split, 0.25, seed=0)["label"]
    assert set(quarter) <= set(half["label"])  # a smaller fraction is part of the larger
    np.testing.assert_array_equal(ch5.subset(split, 1.0, seed=3)["label"], np.arange(100))


@pytest.mark.parametrize("override, message", [
    ("--config.model.patch_size=3", "patch size 3 does not divide the image size 8x8"),
    ("--config.vlm.text_context=20", "question 'how many white circles?' with its answer is "
                                     "27 tokens, longer than the text context 20"),
    ("--config.compare.fractions=(0.0,)", "compare.fractions entries must be in (0, 1]"),
])
def test_bad_input_is_one_line(tmp_path, capsys, override, message):
    config = ("--config=configs/ch5_vit_vs_cnn.py:smoke" if "fractions" in override
              else "--config=configs/ch5_vqa.py:smoke" if "vlm" in override else SMOKE)
    with pytest.raises(SystemExit) as info:
        ch5.main([config, f"--workdir={tmp_path}", override])
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert info.value.code == (1 if "fractions" in override else 2)
    assert not (tmp_path / "summary.json").exists()


def test_gpu_preset_runs_on_cifar_shaped_data_in_bfloat16(tmp_path):
    """ch5_vit:gpu (CIFAR-10 from a folder, bfloat16 parameters and compute), cut to 2 layers
    and 2 steps on 240 random CIFAR-format images: the code path no CPU preset takes."""
    rng = np.random.default_rng(0)
    data = tmp_path / "cifar-10-batches-py"
    data.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (40, 3072)).astype(np.uint8),
                 b"labels": rng.integers(0, 10, 40).tolist()}
        (data / name).write_bytes(pickle.dumps(batch, protocol=2))
    env = {**os.environ, "XLA_FLAGS": FAST_COMPILE}
    done = subprocess.run(
        [sys.executable, "-m", "jaxcourse.ch5", "--config=configs/ch5_vit.py:gpu",
         f"--workdir={tmp_path / 'run'}", f"--config.data.path={tmp_path}", "--no-cache",
         "--config.model.n_layer=2", "--config.train.steps=2", "--config.train.batch_size=16",
         "--config.train.steps_per_call=1", "--config.train.eval_every=2",
         "--config.optimizer.warmup_steps=1", "--config.eval_batch_size=32"],
        env=env, cwd=REPO, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    run = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (run["model"]["dtype"], run["train"]["precision"]) == ("bfloat16", "bfloat16")
    m = _summary(tmp_path / "run")
    # the preset's ViT on 3-channel 32x32 images: 4x4x3 patches to width 384, 2 blocks of
    # attention (4 projections with biases), an MLP of 768 and 2 LayerNorms, a final
    # LayerNorm, a 10-way head; mean pooling and sin-cos positions add no parameters
    block = 4 * (384 * 384 + 384) + 2 * 384 * 768 + 768 + 384 + 2 * 2 * 384
    assert m["vit_params"] == 4 * 4 * 3 * 384 + 384 + 2 * block + 2 * 384 + 384 * 10 + 10
    assert math.isfinite(m["vit_test_loss"])
