"""LoRA: merged == unmerged outputs, exact unmerge, shapes, LoRA+ group, training and restore."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxcourse import config
from jaxcourse.errors import UserError
from jaxcourse.models import lora
from jaxcourse.lm import count_params, lm_task
from jaxcourse.models.transformer import GPT, GPTConfig
from jaxcourse.parallel.mesh import mesh_config
from jaxcourse.train import Task, make_optimizer, train

MC = GPTConfig(vocab_size=11, context=8, n_layer=2, n_head=2, d_model=16, pos="learned",
               norm="layernorm")
TOKENS = jax.random.randint(jax.random.key(0), (2, 8), 0, 11)


@pytest.fixture(scope="module")
def params():
    return nn.meta.unbox(jax.jit(GPT(MC).init)(jax.random.key(1), TOKENS)["params"])


def _trained_like(adapters):
    """Non-zero B so the adapters actually change the model."""
    leaves, tree = jax.tree.flatten(adapters)
    keys = jax.random.split(jax.random.key(3), len(leaves))
    return jax.tree.unflatten(tree, [x + 0.1 * jax.random.normal(k, x.shape)
                                     for x, k in zip(leaves, keys)])


def test_shapes_and_trainable_count(params):
    cfg = lora.LoRAConfig(rank=4)
    adapters = lora.init_adapters(jax.random.key(2), params, cfg, d_model=16)
    assert len(adapters) == 2 * 6  # q, k, v, out, up, down in each of 2 layers
    out = adapters["blocks/layer_0/attention/out"]  # kernel [heads=2, head_dim=8, d_model=16]
    assert out["a"].shape == (16, 4) and out["b"].shape == (4, 16)
    assert adapters["blocks/layer_1/mlp/down"]["a"].shape == (64, 4)
    # Per layer: 4 attention maps 4*(16+16) + up 4*(16+64) + down 4*(64+16), times 2 layers.
    assert count_params(adapters) == 2 * (4 * 4 * 32 + 4 * 80 + 4 * 80) == 2304
    assert all(float(jnp.abs(a["b"]).max()) == 0.0 for a in adapters.values())
    assert lora.in_axes((2, 8, 16), 16) == 2 and lora.in_axes((16, 2, 8), 16) == 1


def test_merged_equals_unmerged_and_unmerge_is_exact(params):
    cfg = lora.LoRAConfig(rank=4, alpha=8.0, lora_plus_ratio=3.0)
    adapters = _trained_like(lora.init_adapters(jax.random.key(2), params, cfg, 16))
    model = GPT(MC)

    @jax.jit
    def outputs(params, adapters):
        merged_params = lora.merge(params, adapters, cfg)
        return (merged_params, model.apply({"params": merged_params}, TOKENS),
                lora.apply_unmerged(model, params, adapters, cfg, TOKENS),
                model.apply({"params": params}, TOKENS))

    merged_params, merged, side_path, base = outputs(params, adapters)
    np.testing.assert_allclose(merged, side_path, atol=2e-5)
    assert float(jnp.abs(merged - base).max()) > 1e-2  # the adapters do change the model
    back = lora.unmerge(merged_params, adapters, cfg)
    for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
        np.testing.assert_allclose(x, y, atol=1e-6)
    # Only the targeted kernels moved.
    untouched = lora.LoRAConfig(rank=4, targets=(r"attention/query$",))
    q_only = lora.merge(params, lora.init_adapters(jax.random.key(2), params, untouched, 16),
                        untouched)
    np.testing.assert_array_equal(q_only["embed"]["embedding"], params["embed"]["embedding"])


def test_fresh_adapters_start_at_the_base_model(params):
    cfg = lora.LoRAConfig(rank=2)
    adapters = lora.init_adapters(jax.random.key(5), params, cfg, 16)
    merged = lora.merge(params, adapters, cfg)
    for x, y in zip(jax.tree.leaves(merged), jax.tree.leaves(params)):
        np.testing.assert_array_equal(x, y)  # B = 0: W + A @ 0 is W, bit for bit


def _loop_config(**optimizer):
    cfg = config.base_config()
    cfg.train.update(steps=12, batch_size=2, steps_per_call=6, log_every=6, eval_every=0)
    cfg.optimizer.update(name="adam", lr=1e-2, **optimizer)
    return ml_collections.ConfigDict(cfg.to_dict())


BATCH = {"inputs": np.asarray(TOKENS), "targets": np.asarray(jnp.roll(TOKENS, -1, 1))}


def test_lora_plus_ratio_is_a_parameter_group_with_a_larger_lr_for_b(params):
    """LoRA+: B's first Adam step is `ratio` times plain LoRA's, A's is unchanged."""
    task = lm_task(MC)
    steps = {}
    for ratio in (1.0, 4.0):
        lcfg = lora.LoRAConfig(rank=4, lora_plus_ratio=ratio)
        ltask = lora.lora_task(task, params, lcfg, 16)
        tree = nn.meta.unbox(ltask.init(jax.random.key(2), BATCH)[0])
        c = lora.with_optimizer_settings(_loop_config(), lcfg).optimizer
        tx = make_optimizer(c, 10)
        grads = jax.grad(lambda p: ltask.loss(p, {}, BATCH, jax.random.key(0), False)[0])(tree)
        updates, _ = jax.jit(tx.update)(grads, tx.init(tree), tree)
        steps[ratio] = updates["lora"]
    for k, up in steps[1.0].items():
        np.testing.assert_array_equal(steps[4.0][k]["b"], 4.0 * up["b"])  # a power of 2: exact
        np.testing.assert_array_equal(steps[4.0][k]["a"], up["a"])
        assert float(jnp.abs(up["b"]).max()) == pytest.approx(1e-2, rel=1e-3)  # Adam: |step| = lr


def test_lora_task_trains_adapters_only_through_the_loop(tmp_path, params):
    lcfg = lora.LoRAConfig(rank=2, lora_plus_ratio=2.0)
    cfg = lora.with_optimizer_settings(_loop_config(), lcfg)
    task = lora.lora_task(lm_task(MC), params, lcfg, d_model=16)
    data = [BATCH] * cfg.train.steps
    state, metrics = train(task, cfg, tmp_path, data)
    assert set(state.params) == {"base", "lora"}
    assert set(state.params["lora"]) == set(lora.target_kernels(params, lcfg))
    n_lora = 2 * (4 * 2 * 32 + 2 * 80 + 2 * 80)
    assert count_params(state.params["lora"]) == n_lora
    for x, y in zip(jax.tree.leaves(state.params["base"]), jax.tree.leaves(params)):
        np.testing.assert_array_equal(x, y)  # frozen: never updated
    # The optimizer keeps Adam's two moments for the adapters only (plus step counters).
    moments = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim > 0)
    assert moments == 2 * n_lora
    before = task.loss(nn.meta.unbox(task.init(jax.random.key(0), BATCH)[0]), {}, BATCH, jax.random.key(0),
                       False)[0]
    after = task.loss(state.params, state.model_state, BATCH, jax.random.key(0), False)[0]
    assert float(after) < float(before) - 0.1
    # The checkpoint holds base and adapters once and restores them bit for bit: a second
    # call finds the run complete and returns the restored state.
    restored, _ = train(task, cfg, tmp_path, data)
    for name in ("params", "opt_state"):
        a, b = getattr(state, name), getattr(restored, name)
        assert jax.tree.structure(a) == jax.tree.structure(b)
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            np.testing.assert_array_equal(x, y)


def test_bad_config(params):
    with pytest.raises(UserError, match="match no kernel"):
        lora.init_adapters(jax.random.key(0), params, lora.LoRAConfig(targets=("nothing",)), 16)
    with pytest.raises(UserError, match="rank >= 1"):
        lora.LoRAConfig(rank=0)


def test_memory_rows_count_trainable_params_and_adam_state(params):
    cfg = config.base_config()
    cfg.optimizer.update(name="adam", lr=1e-3)
    lcfg = lora.LoRAConfig(rank=2)
    sft, lo = lora.memory_rows(MC, lcfg, ml_collections.ConfigDict(cfg.to_dict()), batch_size=2)
    assert sft["trainable_params"] == count_params(params)
    assert lo["trainable_params"] == count_params(lora.init_adapters(jax.random.key(0), params, lcfg, 16))
    for row in (sft, lo):  # Adam keeps two float32 moments per trainable parameter (+ a count).
        assert row["optimizer_state_MB"] * 2**20 == pytest.approx(8 * row["trainable_params"], abs=64)
        assert row["peak_MB"] >= row["arguments_MB"] > 0
    # LoRA's arguments still hold the frozen base (as params), but not its moments.
    assert lo["arguments_MB"] < sft["arguments_MB"]


def test_lora_base_is_sharded_like_the_params_under_fsdp(tmp_path, params):
    """The frozen base takes the logical-axis names of the base task's init: split 8 ways on
    an fsdp=8 mesh (like the parameters of a full fine-tune), and still exactly the base."""
    model = GPT(MC)
    boxed = Task(init=lambda rng, b: (model.init(rng, jnp.asarray(b["inputs"][:1]))["params"], {}),
                 loss=lm_task(MC).loss)  # keeps nn.Partitioned boxes (logical names)
    lcfg = lora.LoRAConfig(rank=2)
    cfg = lora.with_optimizer_settings(_loop_config(), lcfg)
    cfg.train.update(steps=2, steps_per_call=2, log_every=2, batch_size=8)
    cfg.mesh = mesh_config(fsdp=8)
    batch = {k: np.tile(v, (4, 1)) for k, v in BATCH.items()}
    state, _ = train(lora.lora_task(boxed, params, lcfg, 16), cfg, tmp_path, [batch] * 2)
    up = state.params["base"]["blocks"]["layer_0"]["mlp"]["up"]["kernel"]  # [embed, mlp]
    assert up.sharding.shard_shape(up.shape) == (16 // 8, 64)
    for x, y in zip(jax.tree.leaves(state.params["base"]), jax.tree.leaves(params)):
        np.testing.assert_array_equal(x, y)
