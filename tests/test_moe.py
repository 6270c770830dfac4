"""Mixture of experts: routing, the loss formulas, capacity and dropping, dense == ragged,
expert parallelism == one device, aux-loss-free balancing, bad input."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcourse.errors import UserError
from jaxcourse.models import aux_losses, moe_routing as routing
from jaxcourse.models.moe import STATE, MoEOptions, block_layout
from jaxcourse.lm import lm_loss
from jaxcourse.models.transformer import GPT, gpt_config, model_section
from jaxcourse.parallel import make_mesh
from jaxcourse.parallel.rules import GPT_RULES, use_mesh


def _cfg(**moe):
    section = model_section(ffn="moe", n_layer=2, d_model=16, n_head=2, vocab_size=11,
                            context=8)
    section.moe.update(moe)
    return gpt_config(section)


def _tokens(b=4, t=8, seed=0):
    return np.random.default_rng(seed).integers(0, 11, (b, t), dtype=np.int32)


def _params(cfg):
    return nn.meta.unbox(GPT(cfg).init(jax.random.key(0), _tokens())["params"])


def _loss(cfg, params, tokens):
    logits, state = GPT(cfg).apply({"params": params}, tokens[:, :-1],
                                   mutable=aux_losses.COLLECTIONS)
    losses, metrics = aux_losses.collect(state)
    value = lm_loss(logits, tokens[:, 1:])[0] + 0.01 * losses["load_balance"]
    return value, metrics


def test_load_balancing_loss_matches_its_formula():
    logits = np.random.default_rng(1).standard_normal((64, 6)).astype(np.float32)
    for k in (1, 2):
        probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
        top = np.argsort(-logits, axis=-1)[:, :k]
        f = np.array([(top == i).any(-1).mean() for i in range(6)])  # per-token fraction
        want = 6 * np.sum(f * probs.mean(0))
        np.testing.assert_allclose(routing.load_balancing_loss(logits, k), want, rtol=1e-5)
    # uniform routing gives k; sending every token to one expert gives E
    np.testing.assert_allclose(routing.load_balancing_loss(np.zeros((8, 4)), 2), 2.0, rtol=1e-6)
    collapsed = np.tile([[30.0, 0, 0, 0]], (8, 1))
    np.testing.assert_allclose(routing.load_balancing_loss(collapsed, 1), 4.0, rtol=1e-5)


def test_router_z_loss_closed_form():
    logits = np.array([[0.0, np.log(3.0)]], np.float32)  # logsumexp = log 4
    np.testing.assert_allclose(routing.router_z_loss(logits), np.log(4.0) ** 2, rtol=1e-6)


def test_top_k_softmax_before_and_after_and_selection_bias():
    logits = jnp.log(jnp.array([[[0.5, 0.3, 0.2]]]))
    w, e = routing.top_k_route(logits, 2, "before")
    np.testing.assert_array_equal(e, [[[0, 1]]])
    np.testing.assert_allclose(w, [[[0.5, 0.3]]], rtol=1e-6)
    w, _ = routing.top_k_route(logits, 2, "after")
    np.testing.assert_allclose(w, [[[0.625, 0.375]]], rtol=1e-6)  # renormalized over the 2
    w, e = routing.top_k_route(logits, 1, "before", bias_E=jnp.array([0.0, 0.0, 5.0]))
    np.testing.assert_array_equal(e, [[[2]]])  # the bias picks the expert ...
    np.testing.assert_allclose(w, [[[0.2]]], rtol=1e-6)  # ... but not the gate weight


def test_capacity_gives_first_choices_priority_and_drops_the_rest():
    # 4 tokens; first choices: 0, 0, 0, 1; second choices: 1, 1, 2, 0. Capacity 2.
    experts = jnp.array([[[0, 1], [0, 1], [0, 2], [1, 0]]])
    weights = jnp.full((1, 4, 2), 0.5)
    dispatch, combine, kept = routing.dispatch_combine(weights, experts, 3, 2)
    np.testing.assert_array_equal(kept[0], [[True, True], [True, False], [False, True],
                                            [True, False]])
    assert dispatch.shape == (1, 4, 3, 2)
    assert int(dispatch[0, :, 0].sum()) == 2 and int(dispatch[0, :, 1].sum()) == 2
    np.testing.assert_allclose(combine.sum(axis=(2, 3))[0], [1.0, 0.5, 0.5, 0.5])
    assert routing.capacity(64, 8, 2, 1.25) == 20 and routing.capacity(64, 8, 2, 0.0) == 64


def test_expert_choice_gives_every_expert_exactly_its_capacity():
    logits = jax.random.normal(jax.random.key(0), (2, 16, 4))
    dispatch, combine = routing.expert_choice(logits, 5)
    np.testing.assert_array_equal(dispatch.sum(axis=(1, 3)), np.full((2, 4), 5))
    probs = jax.nn.softmax(logits, -1)
    np.testing.assert_allclose(combine.sum(-1), probs * dispatch.any(-1), rtol=1e-6)


@pytest.mark.parametrize("impl,activation", [("ragged", "gelu"), ("ragged", "swiglu"),
                                             ("blocked", "gelu"), ("blocked", "swiglu")])
def test_dense_and_sorted_dropless_are_the_same_function(impl, activation):
    dense = _cfg(capacity_factor=0.0, activation=activation)
    # block 3: experts' last blocks part-filled, some blocks past the last expert's
    ragged = _cfg(capacity_factor=0.0, impl=impl, activation=activation, block=3)
    params, tokens = _params(dense), _tokens()
    (a, _), ga = jax.value_and_grad(lambda p: _loss(dense, p, tokens), has_aux=True)(params)
    (b, _), gb = jax.value_and_grad(lambda p: _loss(ragged, p, tokens), has_aux=True)(params)
    np.testing.assert_allclose(a, b, rtol=1e-6)
    for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
        np.testing.assert_allclose(x, y, atol=1e-6)


def test_block_layout_puts_each_assignment_in_a_block_of_its_expert():
    experts = jnp.array([[[2, 0], [2, 1], [0, 2], [2, 0], [3, 2]]])  # expert 1: 1, 3: 1
    dest, expert_of_block = block_layout(experts, 4, 2)
    flat = np.asarray(experts).reshape(-1)
    assert len(set(np.asarray(dest).tolist())) == flat.size  # one row each
    np.testing.assert_array_equal(np.asarray(expert_of_block)[np.asarray(dest) // 2], flat)
    # sizes 3, 1, 5, 1 -> blocks 2, 1, 3, 1 (7 of the static 5 + 4 = 9), each expert's in
    # assignment order
    np.testing.assert_array_equal(expert_of_block, [0, 0, 1, 2, 2, 2, 3, 3, 3])
    np.testing.assert_array_equal(dest[flat == 2], [6, 7, 8, 9, 10])


def test_pallas_equals_ragged_values_and_grads():
    """impl=pallas is the same function as impl=ragged (on CPU through the kernel's reference;
    the kernel itself is tested against ragged_dot in test_pallas_grouped_matmul.py)."""
    ragged = _cfg(capacity_factor=0.0, impl="ragged", activation="swiglu")
    pallas = _cfg(capacity_factor=0.0, impl="pallas", activation="swiglu")
    params, tokens = _params(ragged), _tokens()
    (a, _), ga = jax.value_and_grad(lambda p: _loss(ragged, p, tokens), has_aux=True)(params)
    (b, _), gb = jax.value_and_grad(lambda p: _loss(pallas, p, tokens), has_aux=True)(params)
    np.testing.assert_allclose(a, b, rtol=1e-6)
    for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
        np.testing.assert_allclose(x, y, atol=1e-6)
    with pytest.raises(UserError, match="model.moe.impl='pallas' is dropless"):
        MoEOptions(impl="pallas")


def test_dropped_tokens_pass_through_the_residual():
    cfg = _cfg(capacity_factor=0.25, top_k=1, n_experts=2)  # capacity 4 of 32 tokens
    from jaxcourse.models.moe import MoE
    moe = MoE(16, 32, cfg.options_for("ffn", "moe"))
    x = jax.random.normal(jax.random.key(1), (4, 8, 16))
    variables = moe.init(jax.random.key(2), x)
    y, state = moe.apply({"params": variables["params"]}, x, mutable=aux_losses.COLLECTIONS)
    zero_rows = np.all(np.asarray(y).reshape(32, 16) == 0, axis=-1)
    assert zero_rows.sum() == 32 - 8  # 2 experts x 4 slots kept, the rest contribute 0
    np.testing.assert_allclose(aux_losses.collect(state)[1]["dropped_fraction"], 24 / 32)


@pytest.mark.parametrize("capacity_factor", [0.0, 1.0])
def test_expert_parallel_equals_one_device(capacity_factor):
    cfg = _cfg(groups=8, capacity_factor=capacity_factor)
    params, tokens = _params(cfg), _tokens(b=8)
    grad = jax.jit(jax.value_and_grad(lambda p, t: _loss(cfg, p, t), has_aux=True))
    (ref, ref_m), ref_g = grad(params, tokens)
    mesh = make_mesh({"expert": 8})
    with use_mesh(mesh, GPT_RULES):
        sharded = jax.jit(jax.value_and_grad(lambda p, t: _loss(cfg, p, t), has_aux=True))
        (got, got_m), got_g = sharded(params, tokens)
        assert "all-to-all" in sharded.lower(params, tokens).compile().as_text()
    np.testing.assert_allclose(got, ref, atol=1e-5)
    np.testing.assert_allclose(got_m["dropped_fraction"], ref_m["dropped_fraction"])
    if capacity_factor:
        assert float(ref_m["dropped_fraction"]) > 0.05  # the dropping case drops
    for a, b in zip(jax.tree.leaves(got_g), jax.tree.leaves(ref_g)):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_aux_free_bias_moves_against_the_load():
    cfg = _cfg(bias_rate=0.1, top_k=1, n_experts=4)
    tokens = _tokens()
    variables = GPT(cfg).init(jax.random.key(0), tokens)
    bias0 = variables[STATE]["blocks"]["layer_0"]["moe"]["bias"]
    np.testing.assert_array_equal(bias0, np.zeros(4))
    _, state = GPT(cfg).apply(variables, tokens, train=True, mutable=[STATE, "intermediates"],
                              rngs={"dropout": jax.random.key(1)})
    load = state["intermediates"]["blocks"]["layer_0"]["moe"]["expert_load"][0]
    bias = state[STATE]["blocks"]["layer_0"]["moe"]["bias"]
    np.testing.assert_allclose(bias, 0.1 * np.sign(np.mean(load) - load), rtol=1e-6)


@pytest.mark.parametrize("moe,match", [
    (dict(top_k=9), r"model.moe.top_k=9 must be in 1..n_experts=8"),
    (dict(impl="ragged"), r"model.moe.impl='ragged' is dropless"),
    (dict(router="hash"), r"model.moe.router='hash' is not one of topk, expert_choice"),
])
def test_bad_options_are_one_line(moe, match):
    with pytest.raises(UserError, match=match):
        MoEOptions(**moe)


def test_experts_not_divisible_by_the_expert_axis_is_one_line():
    cfg = _cfg(n_experts=6, groups=8)
    params = _params(cfg)
    with use_mesh(make_mesh({"expert": 4, "data": 2}), GPT_RULES):
        with pytest.raises(UserError, match="n_experts=6 .* divisible by the expert mesh axis"):
            jax.eval_shape(lambda p: GPT(cfg).apply({"params": p}, _tokens(b=8)), params)


def test_lm_task_adds_weighted_aux_losses_in_training_only_and_carries_router_state():
    from jaxcourse.lm import lm_task
    cfg = _cfg(bias_rate=0.1)
    tokens = _tokens()
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    task = lm_task(cfg, aux_weights={"load_balance": 0.5, "z_loss": 0.0, "absent": 1.0})
    params, state = task.init(jax.random.key(0), batch)
    params = nn.meta.unbox(params)
    assert set(state) == {STATE}
    rng = jax.random.key(1)
    train_loss, (m, new_state) = task.loss(params, state, batch, rng, True)
    eval_loss, (m_eval, same_state) = task.loss(params, state, batch, rng, False)
    np.testing.assert_allclose(eval_loss, m_eval["loss"], rtol=1e-6)  # the LM loss alone
    np.testing.assert_allclose(train_loss, m["loss"] + 0.5 * m["aux/load_balance"], rtol=1e-5)
    assert float(m["aux/load_balance"]) > 1.0 and "aux/load_cv" in m
    moved = new_state[STATE]["blocks"]["layer_0"]["moe"]["bias"]
    assert float(jnp.abs(moved).sum()) > 0  # training updated the balancing bias
    np.testing.assert_array_equal(same_state[STATE]["blocks"]["layer_0"]["moe"]["bias"], 0.0)
