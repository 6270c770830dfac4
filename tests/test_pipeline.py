"""GPipe over the `pipeline` axis: schedule arithmetic, a toy pipeline, and the GPT pipelined."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxcourse.errors import UserError
from jaxcourse.models.transformer import GPT, GPTConfig, Stack
from jaxcourse.parallel import GPT_RULES, make_mesh, sharded_init, unbox, use_mesh
from jaxcourse.parallel.pipeline import (bubble_fraction, from_microbatches, gpipe, pipelined,
                                         schedule_stats, to_microbatches)


@pytest.mark.parametrize("stages, micro", [(4, 4), (4, 8), (2, 6), (1, 3)])
def test_schedules_bubble_and_activation_memory(stages, micro):
    gpipe_s, one_f_one_b = schedule_stats(stages, micro, "gpipe"), schedule_stats(stages, micro, "1f1b")
    # Unit-time forward and backward: both take 2(M + S - 1) ticks ...
    assert gpipe_s["ticks"] == one_f_one_b["ticks"] == 2 * (micro + stages - 1)
    assert gpipe_s["bubble"] == pytest.approx(bubble_fraction(stages, micro))
    assert bubble_fraction(4, 4) == pytest.approx(3 / 7)
    # ... but GPipe keeps every microbatch's activations, 1F1B at most one per stage ahead.
    assert gpipe_s["peak_activations"] == micro
    assert one_f_one_b["peak_activations"] == min(stages, micro)


def test_toy_pipeline_matches_sequential_stages_forward_and_backward():
    mesh = make_mesh({"pipeline": 4, "data": 2})
    w = jax.random.normal(jax.random.key(0), (4, 8, 8)) * 0.5
    x = jax.random.normal(jax.random.key(1), (16, 8))
    stage = lambda w, x: jnp.tanh(x @ w)  # noqa: E731

    def sequential(w, x):
        for s in range(4):
            x = stage(w[s], x)
        return x

    def piped(w, x):
        return from_microbatches(gpipe(stage, w, to_microbatches(x, 4, mesh), mesh))

    with jax.set_mesh(mesh):
        out, grad = jax.jit(jax.value_and_grad(lambda w, x: (piped(w, x) ** 2).sum()))(w, x)
    ref, ref_grad = jax.value_and_grad(lambda w, x: (sequential(w, x) ** 2).sum())(w, x)
    np.testing.assert_allclose(out, ref, rtol=1e-5)
    np.testing.assert_allclose(grad, ref_grad, atol=1e-5)
    with pytest.raises(UserError, match="expected the 4 pipeline stages"):
        gpipe(stage, w[:2], x[None], mesh)


def test_gpt_pipelined_loss_and_gradients_match_single_device():
    cfg = GPTConfig(vocab_size=32, context=8, n_layer=4, n_head=2, d_model=16,
                    scan_layers=True)
    model = GPT(cfg)
    tokens = jax.random.randint(jax.random.key(1), (8, 8), 0, 32)
    init = lambda r, t: model.init(r, t)["params"]  # noqa: E731

    def loss(p, t):
        logits = model.apply({"params": p}, t)
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], t[:, 1:]).mean()

    params = unbox(jax.jit(init)(jax.random.key(0), tokens))
    ref_loss, ref_grads = jax.jit(jax.value_and_grad(loss))(params, tokens)
    mesh = make_mesh({"pipeline": 4, "data": 2})
    with use_mesh(mesh, GPT_RULES):
        sharded, _ = sharded_init(init, GPT_RULES, mesh, jax.random.key(0), tokens)

        def piped_loss(p, t):
            with pipelined(Stack, mesh, microbatches=2):
                return loss(p, t)

        got_loss, got_grads = jax.jit(jax.value_and_grad(piped_loss))(sharded, tokens)
    assert abs(float(got_loss) - float(ref_loss)) < 1e-5
    for g, r in zip(jax.tree.leaves(got_grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(g, r, atol=1e-5)
    with use_mesh(mesh, GPT_RULES), pipelined(Stack, mesh, microbatches=3):
        with pytest.raises(UserError, match="cannot be cut into 3 microbatches"):
            jax.eval_shape(loss, sharded, tokens)
