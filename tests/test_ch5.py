"""Chapter 5 end to end on the smoke preset: the ViT run, ViT vs CNN, one-line bad input."""
import json
import math

import numpy as np
import pytest

from jaxcourse import ch5

SMOKE = "--config=configs/ch5_vit.py:smoke"


def _summary(workdir):
    return json.loads((workdir / "summary.json").read_text())["metrics"]


def test_vit_run_trains_and_draws_attention(tmp_path):
    ch5.main([SMOKE, f"--workdir={tmp_path}"])
    m = _summary(tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert len(losses) == 3 and losses[-1] < losses[0]  # 30 steps: it starts to learn
    assert 0.0 <= m["vit_test_accuracy"] <= 1.0 and math.isfinite(m["vit_test_loss"])
    # 16 patches of 2x2x1 into width 32, a class token, 1 block of width 32 (MLP 64; biases),
    # the final norm, a 10-way head
    d, f = 32, 64
    block = 2 * 2 * d + 4 * (d * d + d) + (d * f + f) + (f * d + d)
    assert m["vit_params"] == (4 * d + d) + d + block + 2 * d + (d * 10 + 10)
    assert (tmp_path / "attention.png").stat().st_size > 5_000
    table = (tmp_path / "results.md").read_text()
    assert f"| vit | {m['vit_test_accuracy']:.4g} |" in table


def test_vit_vs_cnn_reports_both(tmp_path):
    workdir = tmp_path / "cmp"
    ch5.main(["--config=configs/ch5_vit_vs_cnn.py:smoke", f"--workdir={workdir}",
              "--config.train.steps=20", "--config.compare.fractions=(1.0,)"])
    m = _summary(workdir)
    for name in ("vit", "cnn"):
        assert m[f"{name}_test_accuracy"] == m[f"{name}_100pct/test_accuracy"]
        assert m[f"{name}_step_ms"] == m[f"{name}_100pct/step_ms"] > 0
    assert m["cnn_params"] == 398 and m["vit_params"] == 9130  # both models, not one twice
    for png in ("attention.png", "data_fraction.png"):
        assert (workdir / png).stat().st_size > 5_000, png


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
    ("--config.compare.fractions=(0.0,)", "compare.fractions entries must be in (0, 1]"),
])
def test_bad_input_is_one_line(tmp_path, capsys, override, message):
    config = ("--config=configs/ch5_vit_vs_cnn.py:smoke" if "fractions" in override
              else SMOKE)
    with pytest.raises(SystemExit) as info:
        ch5.main([config, f"--workdir={tmp_path}", override])
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert info.value.code == (2 if "patch" in override else 1)
