"""Chapter 4 end to end (smoke presets): pretraining, the saved model, fine-tuning, bad input."""
import json
import math

import jax
import numpy as np
import pytest

from jaxcourse import ch4
from jaxcourse.models import lora
from jaxcourse.models.grad_barriers import with_grad_barriers
from jaxcourse.models.transformer import GPTConfig, lm_task


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """One smoke pretraining run on the embedded stdlib corpus, shared by the tests below."""
    workdir = tmp_path_factory.mktemp("ch4") / "gpt"
    ch4.main(["--config=configs/ch4_gpt.py:smoke", f"--workdir={workdir}"])
    return workdir


def test_pretrain_summary_and_saved_model(pretrained):
    m = json.loads((pretrained / "summary.json").read_text())["metrics"]
    assert m["steps"] == 20 and m["tokens_per_second"] > 0
    assert 0 < m["val_loss"] < math.log(m["vocab_size"])  # better than a uniform guess
    # val_loss is nanoGPT's estimate: the mean loss over eval_batches random validation
    # batches. Recompute it from the *saved* model and tokenizer on the same batches.
    cfg = ch4.pretrain_config("smoke")
    model_cfg, params, tok = ch4.load_model(pretrained)
    corpus = ch4.load_corpus(cfg)
    assert tok.vocab_size == corpus.tokenizer.vocab_size == model_cfg.vocab_size
    val = ch4.random_batches(corpus.val, cfg.lm.eval_batches, cfg.train.batch_size,
                             model_cfg.context, cfg.train.seed + 1)
    assert ch4.mean_loss(model_cfg, params, val) == pytest.approx(m["val_loss"], rel=1e-5)
    assert (pretrained / "sample.txt").read_text().startswith(cfg.lm.prompt)


def test_grad_barriers_change_nothing_but_fusion():
    mc = GPTConfig(vocab_size=13, context=8, n_layer=2, n_head=2, d_model=16)
    task = lm_task(mc)
    tokens = jax.random.randint(jax.random.key(0), (2, 9), 0, 13)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    params, _ = task.init(jax.random.key(1), batch)

    @jax.jit
    def both_grads(params):
        grad = lambda t: jax.grad(lambda p: t.loss(p, {}, batch, jax.random.key(2), True)[0])  # noqa: E731
        return grad(task)(params), grad(with_grad_barriers(task))(params)

    plain, barriered = both_grads(params)
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(barriered)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_finetune_from_saved_base(pretrained, tmp_path):
    ch4.main(["--config=configs/ch4_finetune.py:smoke", f"--config.finetune.base={pretrained}",
              f"--workdir={tmp_path}"])
    m = json.loads((tmp_path / "summary.json").read_text())["metrics"]
    model_cfg, params, _ = ch4.load_model(pretrained)
    assert m["sft/trainable_params"] == lora.count(params)
    adapters = lora.init_adapters(jax.random.key(0), params, lora.LoRAConfig(rank=8), 32)
    assert m["lora/trainable_params"] == lora.count(adapters) == 4 * 8 * 64 + 2 * 8 * 160
    assert m["lora/optimizer_state_MB"] < 0.5 * m["sft/optimizer_state_MB"]
    for method in ("prompting", "sft", "lora"):
        assert 0.0 <= m[f"{method}/accuracy"] <= 1.0
    assert m["prompting/pretrain_val_loss"] > 0
    assert "| lora |" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "accuracy.png").stat().st_size > 0


@pytest.mark.parametrize("args, message", [
    (["--config.tokenizer.name=wordpiece"], "unknown tokenizer 'wordpiece'"),
    (["--config.data.path={empty}"], "is empty"),
    (["--config.lm.prompt=" + "x" * 40], "longer than the model context 16"),
])
def test_bad_input_is_one_line(tmp_path, capsys, args, message):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    argv = ["--config=configs/ch4_gpt.py:smoke", f"--workdir={tmp_path / 'run'}"]
    with pytest.raises(SystemExit) as e:
        ch4.main(argv + [a.format(empty=empty) for a in args])
    assert e.value.code == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err


def test_finetune_needs_a_pretrained_base(tmp_path, capsys):
    with pytest.raises(SystemExit):
        ch4.main(["--config=configs/ch4_finetune.py:smoke",
                  f"--config.finetune.base={tmp_path / 'nothing'}", f"--workdir={tmp_path}"])
    assert "no pretrained model" in capsys.readouterr().err
