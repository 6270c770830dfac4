"""Chapter 3 end to end on smoke presets, plus its data helpers."""
import json
import math

import numpy as np
import pytest

from jaxcourse import ch3, config
from jaxcourse.lm import eval_windows
from jaxcourse.lm.configs import char_gpt_config


def _run(tmp_path, name, *overrides):
    workdir = tmp_path / name
    ch3.main([f"--config=configs/ch3_{name}.py:smoke", f"--workdir={workdir}", *overrides])
    return workdir, json.loads((workdir / "summary.json").read_text())["metrics"]


def test_train_experiment_writes_metrics_figures_and_sample(tmp_path):
    workdir, m = _run(tmp_path, "gpt")
    assert m["steps"] == 20
    assert m["eval/perplexity"] == pytest.approx(math.exp(m["eval/loss"]), rel=1e-6)
    # 20 steps must beat the uniform guess over the vocabulary: loss < ln(vocab).
    assert m["eval/loss"] < math.log(m["vocab_size"])
    for name in ("attention.png", "curves.png", "results.md", "sample.txt"):
        assert (workdir / name).stat().st_size > 0, name
    corpus = ch3.load_corpus(char_gpt_config("smoke"))
    prompt = corpus.tokenizer.decode(corpus.val[:8])  # the default prompt: validation text
    assert (workdir / "sample.txt").read_text().startswith(prompt)


def test_decode_experiment_compares_cache_with_recompute(tmp_path):
    workdir, m = _run(tmp_path, "decode")
    assert m["8/same_tokens"] is True  # KV cache and recompute agree token for token
    assert "KV-cache decode vs recompute" in (workdir / "results.md").read_text()


def test_context_experiment_table(tmp_path):
    # One context keeps the test cheap; the sweep is a loop over the same code.
    workdir, m = _run(tmp_path, "context", "--config.sweep.contexts=(8,)")
    assert m["context_8/batch"] == 64 // 8  # tokens_per_step is held fixed
    assert m["context_8/val_ppl"] == pytest.approx(math.exp(m["context_8/val_loss"]))
    # 20 steps beat the uniform guess (ln 92 = 4.52) at every position; measured 4.39.
    vocab = ch3.load_corpus(char_gpt_config("smoke")).tokenizer.vocab_size
    assert m["context_8/last_position_loss"] < math.log(vocab) - 0.05
    assert m["context_8/val_loss"] < math.log(vocab) - 0.05
    assert (workdir / "context.png").exists() and (workdir / "results.md").exists()


def test_eval_windows_are_contiguous_and_shared():
    tokens = np.arange(20, dtype=np.int32)
    (batch,) = eval_windows(tokens, context=4, max_tokens=8, batch_size=16)
    np.testing.assert_array_equal(batch["inputs"], [[0, 1, 2, 3], [4, 5, 6, 7]])
    np.testing.assert_array_equal(batch["targets"], [[1, 2, 3, 4], [5, 6, 7, 8]])


def test_corpus_from_a_text_file(shakespeare_path):
    cfg = char_gpt_config("smoke")
    cfg.data.path, cfg.lm.max_chars = str(shakespeare_path), 0
    corpus = ch3.load_corpus(cfg)
    assert corpus.tokenizer.vocab_size == 65  # tinyshakespeare's distinct characters
    n = len(shakespeare_path.read_text())
    assert len(corpus.train) + len(corpus.val) == n
    assert len(corpus.train) == int(n * (1 - cfg.lm.val_fraction))  # nanoGPT's split
    assert corpus.tokenizer.decode(corpus.train[:9]) == "First Cit"


def test_bad_model_setting_is_one_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        ch3.main(["--config=configs/ch3_gpt.py:smoke", f"--workdir={tmp_path}",
                  "--config.model.norm_position=middle"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "norm_position='middle'" in err


def test_every_ch3_config_loads_all_presets():
    for name, _ in config.experiments("ch3"):
        for preset in config.PRESETS:
            cfg, _, _ = config.load(f"{name}:{preset}")
            assert cfg.experiment in ch3.EXPERIMENTS
