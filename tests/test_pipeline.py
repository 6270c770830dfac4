"""GPipe over the `pipeline` axis: schedule arithmetic, a toy pipeline, and the GPT pipelined."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcourse.errors import UserError
from jaxcourse.models.transformer import GPT, GPTConfig, Stack
from jaxcourse.parallel import GPT_RULES, make_mesh, unbox, use_mesh
from jaxcourse.parallel.pipeline import (bubble_fraction, from_microbatches, gpipe, pipelined,
                                         schedule_stats, to_microbatches)
from jaxcourse.parallel.pipeline_1f1b import one_f_one_b


@pytest.mark.parametrize("stages, micro", [(4, 4), (4, 8), (2, 6), (1, 3)])
def test_schedules_bubble_and_activation_memory(stages, micro):
    gpipe_s = schedule_stats(stages, micro, "gpipe")
    one_f_one_b = schedule_stats(stages, micro, "1f1b")
    # Unit-time forward and backward: both take 2(M + S - 1) ticks ...
    assert gpipe_s["ticks"] == one_f_one_b["ticks"] == 2 * (micro + stages - 1)
    assert gpipe_s["bubble"] == pytest.approx(bubble_fraction(stages, micro))
    assert bubble_fraction(4, 4) == pytest.approx(3 / 7)
    # ... but GPipe keeps every microbatch's activations, 1F1B at most one per stage ahead.
    assert gpipe_s["peak_activations"] == micro
    assert one_f_one_b["peak_activations"] == min(stages, micro)


def test_gpipe_and_1f1b_match_sequential_stages_forward_and_backward():
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

    # 1F1B, executed: the same stages, a per-microbatch loss with its own parameters.
    readout = jax.random.normal(jax.random.key(2), (8, 3))
    targets = jax.random.normal(jax.random.key(3), (4, 4, 3))
    loss = lambda r, y, t: jnp.mean((y @ r - t) ** 2)  # noqa: E731

    def sequential_loss(w, r, x, t):
        return jnp.mean(jax.vmap(lambda xm, tm: loss(r, sequential(w, xm), tm))(x, t))

    micro = x.reshape(4, 4, 8)
    with jax.set_mesh(mesh):
        got = jax.jit(jax.value_and_grad(one_f_one_b(stage, loss, mesh), argnums=(0, 1, 2)))(
            w, readout, micro, targets)
    want = jax.value_and_grad(sequential_loss, argnums=(0, 1, 2))(w, readout, micro, targets)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    for g, r in zip(got[1], want[1]):
        np.testing.assert_allclose(g, r, atol=1e-5)
    with pytest.raises(UserError, match="expected the 4 pipeline stages"):
        gpipe(stage, w[:2], x[None], mesh)


def test_gpt_stack_pipelines_only_when_its_layers_and_batch_split():
    """The interceptor's checks (the pipelined GPT's losses are tested in test_ch9.py)."""
    cfg = GPTConfig(vocab_size=32, context=8, n_layer=4, n_head=2, d_model=16,
                    scan_layers=True)
    tokens = jnp.zeros((8, 8), jnp.int32)
    params = jax.eval_shape(lambda r: unbox(GPT(cfg).init(r, tokens)["params"]),
                            jax.random.key(0))
    forward = lambda p, t: GPT(cfg).apply({"params": p}, t)  # noqa: E731
    mesh = make_mesh({"pipeline": 4, "data": 2})
    with use_mesh(mesh, GPT_RULES), pipelined(Stack, mesh, microbatches=2):
        assert jax.eval_shape(forward, params, tokens).shape == (8, 8, 32)
    # A new function: jax caches traces by function, and the interceptor is not in the key
    # (so the `with pipelined(...)` belongs inside the function that is jitted).
    with use_mesh(mesh, GPT_RULES), pipelined(Stack, mesh, microbatches=3):
        with pytest.raises(UserError, match="cannot be cut into 3 microbatches"):
            jax.eval_shape(lambda p, t: GPT(cfg).apply({"params": p}, t), params, tokens)
    odd = GPTConfig(vocab_size=32, context=8, n_layer=3, n_head=2, d_model=16, scan_layers=True)
    odd_params = jax.eval_shape(lambda r: unbox(GPT(odd).init(r, tokens)["params"]),
                                jax.random.key(0))
    with use_mesh(mesh, GPT_RULES), pipelined(Stack, mesh, microbatches=2):
        with pytest.raises(UserError, match="n_layer=3 cannot be split into 4 pipeline stages"):
            jax.eval_shape(lambda p, t: GPT(odd).apply({"params": p}, t), odd_params, tokens)
