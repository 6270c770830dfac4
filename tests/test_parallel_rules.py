"""Logical-axis rules -> shardings: hand-worked specs, a golden table per layout, sharded init."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from jaxcourse.errors import UserError
from jaxcourse.models.transformer import GPT, GPTConfig
from jaxcourse.parallel import (GPT_RULES, layout_config, logical_to_spec, make_mesh,
                                match_shardings, shard_batch, sharded_init, specs,
                                tree_shardings, unbox)
from jaxcourse.parallel.batch import batch_sharding, process_rows, put_global

# A smoke GPT whose parameter tree every layout below shards.
CFG = GPTConfig(vocab_size=64, context=16, n_layer=4, n_head=4, d_model=32,
                scan_layers=True, tie_embeddings=False)
TOKENS = jnp.zeros((8, 16), jnp.int32)

# Golden parameter shardings: (path, spec) per layout. Stacked layer params lead with
# the "layers" axis; q/k/v are [L, embed, heads, head_dim], out is [L, heads, head_dim, embed].
_Q, _O, _UP, _DOWN = ("blocks/layers/attention/query/kernel", "blocks/layers/attention/out/kernel",
                      "blocks/layers/mlp/up/kernel", "blocks/layers/mlp/down/kernel")
_NORM, _EMB, _HEAD = ("blocks/layers/mlp_norm/scale", "embed/embedding", "lm_head/kernel")
GOLDEN = {
    "dp": {_Q: P(), _O: P(), _UP: P(), _DOWN: P(), _NORM: P(), _EMB: P(), _HEAD: P()},
    "fsdp": {_Q: P(None, "fsdp"), _O: P(None, None, None, "fsdp"), _UP: P(None, "fsdp"),
             _DOWN: P(None, None, "fsdp"), _NORM: P(None, "fsdp"), _EMB: P(None, "fsdp"),
             _HEAD: P("fsdp")},
    "tp": {_Q: P(None, None, "tensor"), _O: P(None, "tensor"), _UP: P(None, None, "tensor"),
           _DOWN: P(None, "tensor"), _NORM: P(), _EMB: P("tensor"), _HEAD: P(None, "tensor")},
    "fsdp_tp": {_Q: P(None, "fsdp", "tensor"), _O: P(None, "tensor", None, "fsdp"),
                _UP: P(None, "fsdp", "tensor"), _DOWN: P(None, "tensor", "fsdp"),
                _NORM: P(None, "fsdp"), _EMB: P("tensor", "fsdp"), _HEAD: P("fsdp", "tensor")},
    "pp": {_Q: P("pipeline"), _O: P("pipeline"), _UP: P("pipeline"), _DOWN: P("pipeline"),
           _NORM: P("pipeline"), _EMB: P(), _HEAD: P()},
}


def _flat(tree):
    leaves = jax.tree_util.tree_leaves_with_path(tree, is_leaf=lambda x: isinstance(x, P))
    return {"/".join(k.key for k in path): leaf for path, leaf in leaves}


@pytest.mark.parametrize("layout", sorted(GOLDEN))
def test_golden_parameter_shardings(layout):
    abstract = jax.eval_shape(lambda r: GPT(CFG).init(r, TOKENS)["params"], jax.random.key(0))
    got = _flat(specs(tree_shardings(abstract, GPT_RULES, make_mesh(layout_config(layout)))))
    for path, spec in GOLDEN[layout].items():
        assert got[path] == spec, (layout, path)
    assert len(got) == 11  # The golden names every kind of parameter of this GPT.


def test_rules_resolve_by_hand():
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    # The batch takes data and fsdp, so the activation's embed dimension stays whole.
    assert logical_to_spec(("batch", "length", "embed"), GPT_RULES, mesh) == P(("data", "fsdp"))
    assert logical_to_spec(("embed", "mlp"), GPT_RULES, mesh) == P("fsdp", "tensor")
    assert logical_to_spec(("mlp", "embed"), GPT_RULES, mesh) == P("tensor", "fsdp")
    # Axes of size 1 drop out: pipeline=1 here.
    assert logical_to_spec(("layers", "embed"), GPT_RULES, mesh) == P(None, "fsdp")
    with pytest.raises(UserError, match="logical axis 'channels' has no sharding rule"):
        logical_to_spec(("channels",), GPT_RULES, mesh)


def test_indivisible_dimension_is_a_clear_error():
    abstract = jax.eval_shape(lambda r: GPT(CFG).init(r, TOKENS)["params"], jax.random.key(0))
    with pytest.raises(UserError, match=r"cannot be split 8 ways over mesh axes \('tensor',\)"):
        tree_shardings(abstract, GPT_RULES, make_mesh({"tensor": 8}))


def test_sharded_init_matches_plain_init_and_optimizer_state_follows_params():
    mesh = make_mesh(layout_config("fsdp_tp"))
    init = lambda r, t: GPT(CFG).init(r, t)["params"]  # noqa: E731
    params, shardings = sharded_init(init, GPT_RULES, mesh, jax.random.key(0), TOKENS)
    plain = unbox(jax.jit(init)(jax.random.key(0), TOKENS))
    for a, b, s in zip(jax.tree.leaves(params), jax.tree.leaves(plain),
                       jax.tree.leaves(shardings)):
        assert a.sharding == s
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-7)  # jit vs eager
    opt = jax.eval_shape(optax.adam(1e-3).init, params)
    opt_shardings = match_shardings(opt, params, shardings, mesh)
    adam = opt_shardings[0]
    assert _flat(specs(adam.mu)) == _flat(specs(shardings))  # ZeRO: moments split like params
    assert adam.count.spec == P()


def test_batches_from_process_rows():
    mesh = make_mesh(layout_config("fsdp_tp"))
    # One process holds every row.
    assert process_rows(batch_sharding(mesh, 1), (3, 8, 16), axis=1) == slice(0, 8)
    tokens = np.arange(8 * 16).reshape(8, 16) % 64
    batch = shard_batch({"tokens": tokens}, mesh)["tokens"]
    assert batch.sharding.spec == P("fsdp")
    np.testing.assert_array_equal(np.asarray(batch), tokens)
    stacked = put_global({"tokens": np.stack([tokens, tokens + 1])}, mesh, leading=1)["tokens"]
    assert stacked.sharding.spec == P(None, "fsdp")
    np.testing.assert_array_equal(np.asarray(stacked)[1], tokens + 1)
    with pytest.raises(UserError, match="batch of 6 rows cannot be split over the 4 batch"):
        put_global({"tokens": tokens[:6]}, mesh)
    # (Every layout's training run through these batches is checked in test_ch9.py.)


def test_sharding_plan_for_the_training_loop():
    from jaxcourse.config import base_config
    from jaxcourse.parallel import ShardingPlan, mesh_config
    from jaxcourse.train import TrainState

    cfg = base_config()
    assert ShardingPlan.from_config(cfg) is None  # no mesh section: the loop runs unsharded
    cfg.mesh = mesh_config(fsdp=4, tensor=2)
    cfg.train.batch_size = 8
    plan = ShardingPlan.from_config(cfg)
    boxed = jax.eval_shape(lambda r: GPT(CFG).init(r, TOKENS)["params"], jax.random.key(0))

    def abstract_state(params):
        return jax.eval_shape(lambda p: TrainState(
            step=jnp.zeros((), jnp.int32), params=p, opt_state=optax.adam(1e-3).init(p),
            model_state={}, ema_params=None, rng=jax.random.key(0)), unbox(params))

    shardings = plan.state_shardings(abstract_state(boxed), boxed)
    want = _flat(specs(tree_shardings(boxed, GPT_RULES, plan.mesh)))
    assert _flat(specs(shardings.params)) == want
    assert _flat(specs(shardings.opt_state[0].nu)) == want
    assert shardings.step.spec == P() and shardings.rng.spec == P()
    with pytest.warns(UserWarning, match="no parameter carries logical axis names"):
        plan.state_shardings(abstract_state(unbox(boxed)), unbox(boxed))
    tokens = np.zeros((8, 16), np.int32)
    assert plan.put_eval({"t": tokens})["t"].sharding.spec == P("fsdp")
    assert plan.put_eval({"t": tokens[:6]})["t"].sharding.spec == P()  # a short last batch
    cfg.train.batch_size = 6
    with pytest.raises(UserError, match="batch_size=6 is not divisible by fsdp=4"):
        ShardingPlan.from_config(cfg)
