"""Chapter 7 end to end on the smoke preset: dense vs MoE, expert parallelism, figures,
the ablation; the two embedded domains."""
import json
import math

import jax
import jax.experimental.compilation_cache.compilation_cache as jax_cache
import numpy as np
import pytest

from jaxcourse import ch7, config
from jaxcourse.data import pipeline
from jaxcourse.errors import UserError
from jaxcourse.lm.configs import moe_config


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    """The lab as its CLI runs it, with a persistent compilation cache (a tmp dir here): the
    programs the lab compiles twice (the MoE run resumed at each mark, the memory analysis of
    the loop's step, the straight and the marked runs below) load instead. Off again after."""
    keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    old = [getattr(jax.config, k) for k in keys]
    jax.config.update(keys[0], str(tmp_path_factory.mktemp("xla")))
    jax.config.update(keys[1], 0.0)
    jax_cache.reset_cache()
    yield
    for k, v in zip(keys, old):
        jax.config.update(k, v)
    jax_cache.reset_cache()


def _run(tmp_path, name, *overrides):
    workdir = tmp_path / name
    ch7.main([f"--config=configs/ch7_{name}.py:smoke", f"--workdir={workdir}", *overrides])
    return workdir, json.loads((workdir / "summary.json").read_text())["metrics"]


def test_moe_lab_compares_dense_and_moe_and_checks_expert_parallelism(tmp_path):
    workdir, m = _run(tmp_path, "moe")
    vocab = ch7.load_domains(moe_config("smoke")).tokenizer.vocab_size
    for key in ("dense_val_loss", "moe_val_loss"):
        assert m[key] < math.log(vocab) - 0.1, (key, m[key])  # both learned something
    # equal active parameters (the MoE routers add d_model x experts per layer)
    assert m["moe_active_params"] - m["dense_params"] == 2 * 32 * 4
    assert m["moe_params"] > 1.4 * m["dense_params"]
    assert m["expert_parallel_devices"] == 4 and m["expert_parallel_max_diff"] < 1e-5
    # dispatch + combine, forward + backward, 2 layers: 4 x 2 x (8 groups / 4 devices) x
    # 4 experts x capacity 16 (dropless: every token of a group) x width 32 x 4 bytes, 3/4 of
    # it leaving the device
    assert m["all_to_all_bytes_per_step"] == 4 * 2 * (2 * 4 * 16 * 32 * 4) * 3 / 4
    assert m["dropped_fraction"] == 0.0 and m["load_cv"] < 1.0
    for png in ("gates.png", "traffic.png", "expert_tokens.png"):
        assert (workdir / png).stat().st_size > 10_000, png


def test_ablation_runs_each_variant(tmp_path):
    _, m = _run(tmp_path, "ablation", "--config.ablation.variants=capacity_1.25,aux_free_bias",
                "--config.train.steps=6")
    assert 0.02 < m["capacity_1.25/dropped_fraction"] < 0.5  # capacity 1.25 drops choices
    # dropless like the base; the bias (not a loss) is what balances this variant
    assert m["aux_free_bias/dropped_fraction"] == 0.0
    for name in ("capacity_1.25", "aux_free_bias"):
        assert np.isfinite(m[f"{name}/val_loss"]) and m[f"{name}/max_expert_share"] < 1.0


def test_two_embedded_domains_share_one_vocabulary():
    cfg = moe_config("smoke")
    domains = ch7.load_domains(cfg)
    assert domains.names == ["stdlib", "pydoc"]
    text = domains.tokenizer.decode(domains.val["pydoc"][:2000].tolist())
    assert text.count(" the ") > 5  # English prose, not code
    with pytest.raises(UserError, match="needs two or more"):
        ch7.load_domains(config.derive(cfg, {"lm.domains": "stdlib"}))


def test_domain_curriculum_batches_come_from_one_domain_first():
    parts = [np.zeros(500, np.int32), np.ones(300, np.int32)]
    data = pipeline.mixture_batches(parts, 8, 16, 0, pure_steps=3)
    for step, domain in ((0, 0), (1, 1), (2, 0)):
        np.testing.assert_array_equal(data[step]["inputs"], domain)
    later = np.concatenate([data[s]["inputs"] for s in range(3, 9)])
    assert 0 < later.mean() < 1  # the mixture from step 3 on ...
    plain = pipeline.lm_batches(np.concatenate(parts), 8, 16, 0)
    np.testing.assert_array_equal(data[5]["inputs"], plain[5]["inputs"])  # ... the plain one


def test_snapshot_marks_train_like_one_straight_run(tmp_path):
    """The MoE run stops at marks to look inside and resumes; its learning-rate schedule
    must span the whole run, not decay to its end at every mark (it once did: the MoE then
    lost to the dense model it now beats)."""
    cfg = config.derive(moe_config("smoke"), {"train.steps": 6, "train.steps_per_call": 1,
                                              "train.eval_every": 0, "train.log_every": 1,
                                              "optimizer.warmup_steps": 1})
    domains = ch7.load_domains(cfg)
    _, moe_cfg = ch7.model_configs(cfg, domains.tokenizer.vocab_size)
    straight, *_ = ch7.fit(cfg, tmp_path / "straight", moe_cfg, domains)
    for steps in (3, 6):
        marked, *_ = ch7.fit(config.derive(cfg, {"train.steps": steps}), tmp_path / "marked",
                             moe_cfg, domains, total_steps=6)
    for a, b in zip(jax.tree.leaves(straight.params), jax.tree.leaves(marked.params)):
        np.testing.assert_array_equal(a, b)
