"""Chapters 3 and 6 on the 8 simulated devices: their presets' one-device mesh becomes an fsdp
or tensor mesh by config, the parameters are split (the LM task and the RL policy keep their
logical axis names) and the numbers stay those of one device. Chapter 4's is in test_lm.py."""
import numpy as np
import pytest

from jaxcourse import ch3, ch6, config
from jaxcourse.lm import count_params
from jaxcourse.parallel import memory


def _derive(spec, overrides):
    cfg, _, _ = config.load(spec)
    return config.derive(cfg, {"model.matmul": "", **overrides})


def _full_bytes(tree) -> int:
    return 4 * count_params(tree)  # float32


@pytest.mark.parametrize("mesh,most", [({"fsdp": -1}, 1 / 5), ({"tensor": 2, "data": -1}, 0.6)])
def test_ch3_gpt_shards_and_keeps_its_losses(tmp_path, mesh, most):
    short = {"train.steps": 4, "train.steps_per_call": 2, "train.eval_every": 4,
             "train.log_every": 2, "model.n_head": 4, "model.d_model": 64,
             "model.vocab_size": 96}  # the 95 characters, padded to split over tensor=2
    cfg = _derive("configs/ch3_gpt.py:smoke", short)
    corpus = ch3.load_corpus(cfg)
    single, one, _ = ch3.fit(cfg, tmp_path / "one", corpus)
    assert memory.bytes_per_device(single.params) == _full_bytes(single.params)
    sharded_cfg = config.derive(cfg, {"mesh.devices": 0, **{f"mesh.{a}": n for a, n in mesh.items()}})
    sharded, many, _ = ch3.fit(sharded_cfg, tmp_path / "sharded", corpus)
    np.testing.assert_allclose(many["eval/loss"], one["eval/loss"], rtol=0, atol=1e-5)
    # fsdp: embedding, attention and MLP matrices split 8 ways, only norm scales stay whole;
    # tensor=2: heads and MLP columns in halves, the embedding whole.
    assert memory.bytes_per_device(sharded.params) <= most * _full_bytes(sharded.params)


def test_ch6_grpo_policy_is_sharded_under_fsdp(tmp_path):
    cfg = _derive("configs/ch6_grpo.py:smoke",
                  {"mesh.devices": 0, "mesh.fsdp": -1, "train.steps": 10})
    model_cfg, task, sft = ch6.sft_start(cfg, tmp_path)
    gc, _ = ch6._grpo_parts(cfg, model_cfg, task)
    params, _, last = ch6._rl_train(ch6._grpo_task(cfg, model_cfg, gc, task, sft), cfg,
                                    tmp_path / "grpo", 2, gc.inner_steps)
    assert memory.bytes_per_device(params) <= _full_bytes(params) / 5
    assert np.isfinite(last["loss"]) and 0.0 <= last["kl"] < 1.0
