"""jaxcourse.lm: the one LM task sharded under FSDP, sampling, model save/load, parameter counts."""
import json

import flax.linen as nn
import jax
import numpy as np
import pytest

from jaxcourse import ch4, config
from jaxcourse.data import pipeline
from jaxcourse.data.tokenizers import CharTokenizer
from jaxcourse.lm import (abstract_params, count_params, lm_task, load_model, sample_text,
                          save_model)
from jaxcourse.models.transformer import GPT, GPTConfig, gpt_config
from jaxcourse.parallel import memory
from jaxcourse.parallel.mesh import mesh_config
from jaxcourse.train import train

TOK = CharTokenizer.from_text("abcdefghij \n")
MC = GPTConfig(vocab_size=TOK.vocab_size, context=16, n_layer=1, n_head=2, d_model=16)


@pytest.fixture(scope="module")
def params():
    return nn.meta.unbox(GPT(MC).init(jax.random.key(0), np.zeros((1, 4), np.int32))["params"])


def _ch4_smoke_run(workdir, mesh):
    """configs/ch4_gpt.py:smoke for 4 steps through ch4's own corpus and task wiring, with
    f32 matmuls: the preset's bf16 matmuls round differently once FSDP changes the order of
    the f32 accumulation (measured: 2e-5 apart at step 4, 5e-7 with f32)."""
    cfg, _, _ = config.load("configs/ch4_gpt.py:smoke")
    cfg = config.derive(cfg, {"train.steps": 4, "train.steps_per_call": 1, "train.log_every": 1,
                              "train.eval_every": 0, "model.matmul": "", "mesh": mesh})
    corpus = ch4.load_corpus(cfg)
    model_cfg = gpt_config(cfg.model, vocab_size=corpus.tokenizer.vocab_size)
    data = pipeline.lm_batches(corpus.train, cfg.train.batch_size, model_cfg.context, 0)
    state, _ = train(ch4.cpu_workarounds(lm_task(model_cfg), cfg), cfg, workdir, data)
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return state, [r["train/loss"] for r in rows if "train/loss" in r]


def test_ch4_smoke_under_fsdp8_splits_params_and_keeps_the_losses(tmp_path):
    single, single_losses = _ch4_smoke_run(tmp_path / "single", None)
    fsdp, fsdp_losses = _ch4_smoke_run(tmp_path / "fsdp", mesh_config(fsdp=8))
    assert len(single_losses) == len(fsdp_losses) == 4
    np.testing.assert_allclose(fsdp_losses, single_losses, rtol=0, atol=1e-5)
    # The task keeps the logical axis names, so FSDP splits every weight matrix 8 ways.
    assert memory.bytes_per_device(fsdp.params) <= memory.bytes_per_device(single.params) / 6
    assert memory.bytes_per_device(fsdp.opt_state) <= memory.bytes_per_device(single.opt_state) / 6


def test_init_keeps_logical_axis_names():
    batch = {"inputs": np.zeros((2, 8), np.int32), "targets": np.zeros((2, 8), np.int32)}
    boxed, _ = jax.eval_shape(lm_task(MC).init, jax.random.key(0), batch)
    names = nn.get_partition_spec(boxed)
    assert tuple(names["embed"]["embedding"]) == ("vocab", "embed")


def test_pipeline_mesh_needs_scanned_layers():
    from jaxcourse.errors import UserError
    from jaxcourse.parallel.mesh import make_mesh
    with pytest.raises(UserError, match="scan_layers"):
        lm_task(MC, make_mesh(mesh_config(pipeline=2, data=-1)), microbatches=2)


def test_sample_text_top_p_keeps_only_the_argmax_when_tiny(params):
    # 3 + 20 tokens > context 16: the sampler crops to context/2 and continues.
    greedy = sample_text(MC, params, TOK, "abc", 20, temperature=0.0)
    nucleus = [sample_text(MC, params, TOK, "abc", 20, top_p=1e-6, seed=s) for s in (1, 2)]
    full = [sample_text(MC, params, TOK, "abc", 20, top_p=1.0, seed=s) for s in (1, 2)]
    assert greedy.startswith("abc") and len(greedy) == 3 + 20
    assert nucleus == [greedy, greedy]  # p -> 0 leaves the most likely token only
    assert full[0] != full[1]  # an untrained model's full distribution is nearly uniform
    assert full[0] == sample_text(MC, params, TOK, "abc", 20, seed=1)  # seeded: reproducible


def test_save_load_round_trip(tmp_path, params):
    save_model(tmp_path, MC, params, TOK)
    model_cfg, loaded, tok = load_model(tmp_path)
    assert model_cfg == MC
    assert tok.encode("a j\n") == TOK.encode("a j\n")
    assert jax.tree.structure(loaded) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)


def test_count_params_by_hand():
    cfg = GPTConfig(vocab_size=50, context=16, n_layer=3, n_head=2, d_model=8)  # RMSNorm, RoPE
    v, d, layers = 50, 8, 3
    per_layer = 4 * d * d + 2 * d * 4 * d + 2 * d  # q, k, v, out; MLP up, down; two norms
    assert count_params(abstract_params(cfg)) == v * d + layers * per_layer + d  # + final norm
    learned = GPTConfig(vocab_size=50, context=16, n_layer=3, n_head=2, d_model=8, pos="learned")
    assert count_params(abstract_params(learned)) == v * d + layers * per_layer + d + 16 * d
