"""Optimizers as the loop builds them: weight-decay masks, and the gradient that reaches them
under gradient accumulation."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxcourse.config import base_config
from jaxcourse.train import Task, TrainState, make_optimizer, make_step
from jaxcourse.train.optim import OPTIMIZERS


def _params():
    """A block's worth of leaves: 2-D kernels and embeddings, 1-D biases and norm scales."""
    k = jax.random.split(jax.random.key(0), 4)
    return {"embed": {"embedding": jax.random.normal(k[0], (11, 8))},
            "up": {"kernel": jax.random.normal(k[1], (8, 16)),
                   "bias": jax.random.normal(k[2], (16,))},
            "norm": {"scale": 1.0 + 0.1 * jax.random.normal(k[3], (8,)),
                     "bias": jnp.full((8,), 0.5)}}


def _zero_grad_step(name, params, weight_decay=0.1):
    c = base_config().optimizer
    c.update(name=name, lr=0.1, weight_decay=weight_decay)  # constant schedule: lr 0.1 at step 0
    tx = make_optimizer(c, 10)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = jax.jit(tx.update)(zeros, tx.init(params), params)
    return optax.apply_updates(params, updates)


@pytest.mark.parametrize("name", OPTIMIZERS)  # every one takes optimizer.weight_decay
def test_weight_decay_moves_kernels_never_biases_or_norm_scales(name):
    """With a zero gradient the only force left is weight decay: it must shrink every matrix
    and leave every bias and norm scale bit for bit where it was (decoupled or coupled L2)."""
    params = _params()
    new = _zero_grad_step(name, params)
    for path, before in jax.tree_util.tree_flatten_with_path(params)[0]:
        after = new
        for key in path:
            after = after[key.key]
        where = f"{name}: {jax.tree_util.keystr(path)}"
        if before.ndim == 1:
            np.testing.assert_array_equal(after, before, err_msg=where)
        else:  # decay pulls towards 0: smaller norm, same direction (not vacuous)
            assert float(jnp.linalg.norm(after)) < 0.999 * float(jnp.linalg.norm(before)), where
    # And without weight decay a zero gradient moves nothing at all.
    for a, b in zip(jax.tree.leaves(_zero_grad_step(name, params, 0.0)), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)


def test_muon_decays_kernels_of_any_rank():
    """optax's muon sends kernels with ndim != 2 (GPT attention [D,H,Dh], scanned [L,...]
    layers, conv kernels) to its Adam part, which does not decay; make_optimizer adds it."""
    params = {"attention": {"kernel": jax.random.normal(jax.random.key(1), (8, 2, 4))}}
    new = _zero_grad_step("muon", params)
    assert float(jnp.abs(new["attention"]["kernel"] - params["attention"]["kernel"]).max()) > 0


# Gradient accumulation, seen by the optimizer. Adam divides by the gradient's own scale, so a
# wrong accumulated scale barely moves the parameters; the raw gradient shows it.

def _record_gradient() -> optax.GradientTransformation:
    """Passes updates through and keeps the last ones in its state."""
    return optax.GradientTransformation(
        init=lambda params: jax.tree.map(jnp.zeros_like, params),
        update=lambda updates, state, params=None: (updates, updates))


def _linear_task():
    """A deterministic task (no dropout), so microbatches and the full batch see the same loss."""
    def init(rng, batch):
        k1, k2 = jax.random.split(rng)
        return {"w": jax.random.normal(k1, (4, 3)), "b": jax.random.normal(k2, (3,))}, {}

    def loss(params, model_state, batch, rng, train):
        pred = jnp.tanh(batch["x"] @ params["w"] + params["b"])
        return jnp.mean((pred - batch["y"]) ** 2), ({}, model_state)

    return Task(init=init, loss=loss)


def _one_step(grad_accum, batch):
    cfg = base_config()
    cfg.train.update(steps=1, batch_size=16, grad_accum=grad_accum)
    task = _linear_task()
    tx = optax.chain(_record_gradient(), optax.adam(1e-2))
    params, model_state = task.init(jax.random.key(0), batch)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                       model_state=model_state, ema_params=None, rng=jax.random.key(1))
    new, metrics = jax.jit(make_step(task, tx, cfg))(state, batch)
    return new.opt_state[0], jax.tree.map(jnp.subtract, new.params, params), metrics["loss"]


def test_grad_accumulation_under_adam_feeds_the_full_batch_gradient():
    rng = np.random.default_rng(0)
    batch = {"x": rng.normal(size=(16, 4)).astype(np.float32),
             "y": rng.normal(size=(16, 3)).astype(np.float32)}
    grad_full, update_full, loss_full = _one_step(1, batch)
    grad_acc, update_acc, loss_acc = _one_step(4, batch)
    np.testing.assert_allclose(loss_acc, loss_full, rtol=1e-6)
    assert all(float(jnp.abs(g).min()) > 1e-4 for g in jax.tree.leaves(grad_full))  # not zeros
    # Relative to the gradient's norm: single elements differ by float32 summation order only.
    diff = jax.tree.map(jnp.subtract, grad_acc, grad_full)
    assert float(optax.tree.norm(diff)) < 1e-6 * float(optax.tree.norm(grad_full))
    for u, v in zip(jax.tree.leaves(update_full), jax.tree.leaves(update_acc)):
        np.testing.assert_allclose(v, u, rtol=1e-5)
