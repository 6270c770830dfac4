"""1F1B pipeline parallelism, executed: interleaved forward and backward in one shard_map.

GPipe (pipeline.py) gets its backward from autodiff, so every stage keeps the activations of
all M microbatches until the backward starts. 1F1B (PipeDream-Flush, Narayanan et al. 2021)
starts a microbatch's backward as soon as the last stage has its loss, so a stage only holds
the microbatches between their forward and their backward: a number set by the depth S, not
by M.

Here every device runs the same program in lockstep ticks. At tick t, stage s
    forward : microbatch t - s                 (input from stage s-1 by ppermute)
    backward: microbatch t - (2S - 2 - s)      (cotangent from stage s+1 by ppermute)
The last stage computes the loss and its cotangent in the same tick as the forward, so its
backward follows at once; each earlier stage's backward comes one tick later per stage. A
stage stashes only its *input* and recomputes its forward inside the backward (`jax.vjp`),
i.e. full activation recomputation; at most 2S - 1 inputs are in flight (2S slots).
M + 2S - 2 ticks in all.

To use it under `jax.grad` the whole schedule sits in a `custom_vjp` whose forward pass
computes loss *and* gradients and whose backward pass only scales them, so it drops into a
loss function like any other op, and the training loop does not change.
"""
from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from jaxcourse.errors import UserError
from jaxcourse.parallel.memory import compiled_memory
from jaxcourse.parallel.pipeline import AXIS, gpipe, varying


def _schedule(stage_fn, loss_fn, mesh: Mesh, m_n: int):
    """The shard_map'd 1F1B run: (stage params [S, ...], loss params, x [M, b, ...],
    targets [M, ...]) -> (mean loss, d stage params, d loss params, d x)."""
    s_n = mesh.shape[AXIS]
    slots = 2 * s_n  # > the 2S - 1 microbatches a stage can hold between forward and backward

    def per_stage(params_1x, loss_params, x, targets):
        params = jax.tree.map(lambda a: a[0], params_1x)
        # Per-stage copies: a gradient with respect to a replicated value would be summed
        # over the stages implicitly (and every stage computes a loss, most of them garbage).
        loss_params = jax.tree.map(varying, loss_params)
        stage = jax.lax.axis_index(AXIS)
        last = stage == s_n - 1
        zeros = lambda tree: jax.tree.map(lambda a: varying(jnp.zeros_like(a)), tree)  # noqa: E731
        forward_shift = [(i, (i + 1) % s_n) for i in range(s_n)]
        backward_shift = [(i, (i - 1) % s_n) for i in range(s_n)]
        loss_grad = jax.value_and_grad(loss_fn, argnums=(0, 1))

        def tick(t, carry):
            received, cotangent_in, stash, grads, loss_grads, dx, loss_sum = carry
            m_f = t - stage
            x_in = jnp.where(stage == 0, x[jnp.clip(m_f, 0, m_n - 1)], received)
            y = stage_fn(params, x_in)
            stash = stash.at[m_f % slots].set(x_in)  # That slot holds no live microbatch.
            loss_m, (d_loss_params, dy) = loss_grad(loss_params, y,
                                                    targets[jnp.clip(m_f, 0, m_n - 1)])
            m_b = t - (2 * s_n - 2 - stage)
            valid_b = (m_b >= 0) & (m_b < m_n)
            _, vjp = jax.vjp(stage_fn, params, stash[m_b % slots])
            d_params, d_x = vjp(jnp.where(last, dy, cotangent_in))
            keep = lambda acc, new: acc + jnp.where(valid_b, new, 0)  # noqa: E731
            grads = jax.tree.map(keep, grads, d_params)
            loss_grads = jax.tree.map(lambda a, g: a + jnp.where(valid_b & last, g, 0),
                                      loss_grads, d_loss_params)
            dx = jnp.where(valid_b & (stage == 0), dx.at[jnp.clip(m_b, 0, m_n - 1)].set(d_x), dx)
            valid_f = (m_f >= 0) & (m_f < m_n)
            loss_sum = loss_sum + jnp.where(valid_f & last, loss_m, 0.0)
            return (jax.lax.ppermute(y, AXIS, forward_shift),
                    jax.lax.ppermute(d_x, AXIS, backward_shift),
                    stash, grads, loss_grads, dx, loss_sum)

        carry = (zeros(x[0]), zeros(x[0]), zeros(jnp.zeros((slots,) + x.shape[1:], x.dtype)),
                 zeros(params), zeros(loss_params), zeros(x), zeros(jnp.zeros((), jnp.float32)))
        out = jax.lax.fori_loop(0, m_n + 2 * s_n - 2, tick, carry)
        _, _, _, grads, loss_grads, dx, loss_sum = out
        # The loss is the mean over microbatches; only the last stage (loss) and the first
        # (input cotangents) hold nonzero values, so a sum over stages hands them to everyone.
        mean = lambda a: a / m_n  # noqa: E731
        return (jax.lax.psum(loss_sum, AXIS) / m_n,
                jax.tree.map(lambda g: mean(g)[None], grads),
                jax.tree.map(lambda g: mean(jax.lax.psum(g, AXIS)), loss_grads),
                mean(jax.lax.psum(dx, AXIS)))

    return jax.shard_map(per_stage, mesh=mesh, in_specs=(P(AXIS), P(), P(), P()),
                         out_specs=(P(), P(AXIS), P(), P()), axis_names={AXIS})


def one_f_one_b(stage_fn: Callable, loss_fn: Callable, mesh: Mesh) -> Callable:
    """A differentiable f(stage_params, loss_params, x [M, b, ...], targets [M, ...]) ->
    mean over microbatches of loss_fn(loss_params, y_m, targets_m), where y_m is x_m run
    through the S stages (stage_fn(stage_params[s], x)), scheduled 1F1B.

    `jax.grad(f)` returns the gradients the schedule computed (for all but the integer
    targets); the cost is one forward + recomputed forward + backward per microbatch.
    """
    def run(stage_params, loss_params, x, targets):
        s_n = mesh.shape[AXIS]
        if {leaf.shape[0] for leaf in jax.tree.leaves(stage_params)} != {s_n}:
            raise UserError(f"1F1B: stage parameters need a leading axis of {s_n} stages")
        return _schedule(stage_fn, loss_fn, mesh, x.shape[0])(stage_params, loss_params, x,
                                                              targets)

    @jax.custom_vjp
    def f(stage_params, loss_params, x, targets):
        return run(stage_params, loss_params, x, targets)[0]

    def f_fwd(stage_params, loss_params, x, targets):
        loss, d_stage, d_loss, d_x = run(stage_params, loss_params, x, targets)
        return loss, (d_stage, d_loss, d_x)

    def f_bwd(saved, g):
        d_stage, d_loss, d_x = saved
        scale = lambda tree: jax.tree.map(lambda a: g * a, tree)  # noqa: E731
        return scale(d_stage), scale(d_loss), scale(d_x), None

    f.defvjp(f_fwd, f_bwd)
    return f


def compare_schedules(mesh: Mesh, microbatches: int, rows: int, width: int, hidden: int,
                      seed: int = 0) -> dict:
    """GPipe (autodiff) vs 1F1B on S residual-MLP stages: loss and gradient agreement, and
    the per-device temporaries XLA allots each compiled training step.

    Stage: x + tanh(x W1) W2 with W1 [width, hidden]; loss: mean squared error of a linear
    read-out. GPipe keeps every microbatch's hidden activations for its backward; 1F1B keeps
    at most 2S stage inputs, so its temporaries do not grow with the number of microbatches.
    """

    s_n = mesh.shape[AXIS]
    keys = jax.random.split(jax.random.key(seed), 5)
    params = {"w1": jax.random.normal(keys[0], (s_n, width, hidden)) / width ** 0.5,
              "w2": jax.random.normal(keys[1], (s_n, hidden, width)) / hidden ** 0.5}
    readout = jax.random.normal(keys[2], (width, 4)) / width ** 0.5
    x = jax.random.normal(keys[3], (microbatches, rows, width))
    targets = jax.random.normal(keys[4], (microbatches, rows, 4))

    def stage(p, h):
        return h + jnp.tanh(h @ p["w1"]) @ p["w2"]

    def loss_fn(r, y, t):
        return jnp.mean((y @ r - t) ** 2)

    def gpipe_loss(p, r, x, t):
        y = gpipe(stage, p, x, mesh)
        return jnp.mean(jax.vmap(loss_fn, in_axes=(None, 0, 0))(r, y, t))

    out = {}
    with jax.set_mesh(mesh):
        for name, fn in (("gpipe", gpipe_loss), ("1f1b", one_f_one_b(stage, loss_fn, mesh))):
            step = jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2)))
            compiled = step.lower(params, readout, x, targets).compile()
            out[name] = (compiled(params, readout, x, targets),
                         compiled_memory(compiled)["temporaries"])
    (loss_g, grads_g), temp_g = out["gpipe"]
    (loss_o, grads_o), temp_o = out["1f1b"]
    diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in
               zip(jax.tree.leaves(grads_g), jax.tree.leaves(grads_o)))
    return {"loss_diff": abs(float(loss_g) - float(loss_o)), "grad_max_diff": diff,
            "gpipe_temp_bytes": temp_g, "1f1b_temp_bytes": temp_o}
