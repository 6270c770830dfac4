"""Chapter 10 end to end on the smoke presets: every mixer as a char LM at equal parameter
count with its decode cost, associative recall, and bad settings as one-line exits."""
import json
import math

import numpy as np
import pytest

from jaxcourse import ch10
from jaxcourse.data import recall
from jaxcourse.lm.params import abstract_params, count_params
from jaxcourse.ssm_lab import cost
from jaxcourse.ssm_lab.configs import MODELS, lab_models, mixers_config


def _run(tmp_path, name, *overrides):
    workdir = tmp_path / name
    ch10.main([f"--config=configs/ch10_{name}.py:smoke", f"--workdir={workdir}", *overrides])
    return workdir, json.loads((workdir / "summary.json").read_text())["metrics"]


def test_every_lab_model_matches_the_reference_size_and_has_its_decode_state():
    """All seven models, shapes only (no training): equal parameter count, and which decode
    states grow with the context."""
    models = lab_models(mixers_config("smoke"), vocab_size=65)
    assert list(models) == list(MODELS)
    params = {n: count_params(abstract_params(m)) for n, m in models.items()}
    for name, count in params.items():
        # equal parameter count within 15% (each ffn width matched to the attention GPT)
        assert abs(count / params["attention"] - 1) < 0.15, (name, count, params)
    state = {n: [cost.state_bytes(m, c) for c in (8, 32)] for n, m in models.items()}
    index = 4  # the int32 fill level, part of every decode state
    # the KV cache grows with the context (4x the positions, 4x the bytes) ...
    assert state["attention"][1] - index == 4 * (state["attention"][0] - index)
    assert state["hybrid"][1] > state["hybrid"][0]
    # ... the recurrent states do not
    for name in ("s4d", "mamba", "mamba2", "rwkv", "retnet"):
        assert state[name][1] == state[name][0] > index, name


def test_mixers_lab_trains_and_measures_decode_cost(tmp_path):
    """The lab end to end on three models: attention (the size reference), RWKV (its
    channel-mix ffn carries a decode state of its own) and the attention,mamba hybrid. Every
    mixer's decode-equals-forward and the Mamba LM's learning are tests of their own
    (test_ssm.py, test_rwkv_retnet.py)."""
    names = ("attention", "rwkv", "hybrid")
    # one decode context: the growth with the context is checked above, shapes only
    workdir, m = _run(tmp_path, "mixers", f"--config.lab.models={','.join(names)}",
                      "--config.decode.contexts=(16,)")
    contexts = (16,)
    for name in names:
        keys = ["val_loss", "tokens_per_second", "params", "d_ff",
                *[f"{k}@{c}" for k in ("decode_ms", "state_bytes") for c in contexts]]
        for key in keys:
            value = m[f"{name}/{key}"]
            assert value is not None and math.isfinite(value) and value > 0, (name, key, value)
        # every model learned something in 10 steps: below the uniform loss ln V
        assert m[f"{name}/val_loss"] < m["uniform_loss"] - 0.02, (name, m[f"{name}/val_loss"])
        assert abs(m[f"{name}/params"] / m["attention/params"] - 1) < 0.15, name
    assert m["attention/state_bytes@16"] > m["rwkv/state_bytes@16"]  # at 16 tokens already
    for png in ("val_loss.png", "decode_cost.png"):
        assert (workdir / png).stat().st_size > 10_000, png
    assert "| rwkv |" in (workdir / "results.md").read_text()


def test_recall_batches_ask_for_values_seen_earlier():
    b = recall.recall_batch(np.random.default_rng(0), 64, n_keys=16, n_values=8, pairs=6,
                            queries=3)
    seq = np.concatenate([b["inputs"], b["targets"][:, -1:]], 1)
    assert seq.shape == (64, recall.seq_len(6, 3) + 1)
    keys, values = seq[:, 0:12:2], seq[:, 1:12:2]
    assert all(len(set(row)) == 6 for row in keys)               # distinct keys
    assert keys.min() >= 1 and keys.max() <= 16 and values.min() >= 17 and values.max() <= 24
    rows, cols = np.nonzero(b["mask"])
    assert len(rows) == 64 * 3
    for r, t in zip(rows, cols):  # input t is a queried key, target t its paired value
        k = b["inputs"][r, t]
        assert b["targets"][r, t] == values[r][list(keys[r]).index(k)]
    same = recall.recall_batches(4, 7, n_keys=16, n_values=8, pairs=6, queries=3)
    np.testing.assert_array_equal(same[3]["inputs"], same[3]["inputs"])  # seeded by step
    assert not np.array_equal(same[3]["inputs"], same[4]["inputs"])


def test_recall_lab_scores_answers_only(tmp_path):
    workdir, m = _run(tmp_path, "recall", "--config.lab.models=attention")
    assert m["chance_accuracy"] == 1 / 8
    assert m["attention/answer_loss"] < math.log(recall.vocab_size(8, 8))
    assert 0.0 < m["attention/accuracy"] <= 1.0
    assert (workdir / "recall.png").stat().st_size > 10_000


@pytest.mark.parametrize("override,message", [
    ("--config.lab.models=attention,lstm", "lab.models: unknown lstm"),
    ("--config.lab.hybrid_pattern=attention,hyena",
     "model.layer_pattern entry='hyena' is not one of"),
    ("--config.model.mamba.d_state=0", "model.mamba.d_state=0 must be a positive integer"),
    ("--config.model.s4d.d_state=-2", "model.s4d.d_state=-2 must be a positive integer"),
    ("--config.model.mamba.chunk=12", "model.mamba.chunk=12 must be a positive power of two"),
    ("--config.model.mixer=hyena", "model.mixer='hyena' is not one of"),
])
def test_bad_model_settings_exit_2_with_one_line(tmp_path, capsys, override, message):
    with pytest.raises(SystemExit) as exit_info:
        ch10.main(["--config=configs/ch10_mixers.py:smoke", f"--workdir={tmp_path}", override])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not list(tmp_path.glob("*/metrics.jsonl"))  # nothing trained


def test_recall_settings_are_checked(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        ch10.main(["--config=configs/ch10_recall.py:smoke", f"--workdir={tmp_path}",
                   "--config.recall.queries=9"])
    assert exit_info.value.code == 2
    assert "queries (9) <= pairs (4)" in capsys.readouterr().err
