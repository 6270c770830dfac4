"""What the loop compiles: the Task contract, one optimizer step, K steps per call, the state.

A `Task` supplies `init` and `loss`, and may bring its own `update` (RL: sample, score,
several optimizer steps per batch of samples). `make_step` turns either into
(state, batch) -> (state, metrics); `jit_steps` scans K of them per compiled call.
"""
import contextlib
import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxcourse.errors import UserError
from jaxcourse.parallel.plan import ShardingPlan
from jaxcourse.parallel.rules import unbox, without_rules
from jaxcourse.train.optim import frozen_mask, learning_rate, make_optimizer
from jaxcourse.train.state import TrainState, all_finite

PRECISIONS = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class Task:
    """What a chapter gives the loop.

    init(rng, batch) -> (params, model_state)
    loss(params, model_state, batch, rng, train) -> (loss, (metrics, new_model_state))
    update(state, batch, rng, tx) -> (state, metrics), optional: replaces the default
        gradient step. It returns the TrainState with new params / opt_state / model_state
        (tx is the loop's optimizer, whose state is state.opt_state); the loop advances
        `step`, keeps the EMA and logs the metrics, which must include "loss" (the
        finiteness guard reads it). `loss` is then needed only for eval.
    """
    init: Callable[..., tuple[Any, Any]]
    loss: Callable[..., tuple[jax.Array, tuple[dict, Any]]] | None = None
    update: Callable[..., tuple[TrainState, dict]] | None = None


def stack_batches(data, start: int, count: int) -> dict:
    """Batches start..start+count-1 stacked on a new leading axis (numpy)."""
    items = [data[i] for i in range(start, start + count)]
    return jax.tree.map(lambda *xs: np.stack(xs), *items)


def _cast_floats(tree, dtype):
    return jax.tree.map(
        lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def _grad_step(task: Task, tx: optax.GradientTransformation, cfg) -> Callable:
    """(state, batch, rng) -> (params, opt_state, model_state, metrics): the default update."""
    tc = cfg.train
    compute_dtype = PRECISIONS[tc.precision]

    def loss_fn(params, model_state, batch, rng):
        frozen = frozen_mask(cfg.optimizer, params)
        if frozen is not None:  # no gradient work (or memory) for frozen parameters.
            params = jax.tree.map(lambda p, f: jax.lax.stop_gradient(p) if f else p,
                                  params, frozen)
        if compute_dtype != jnp.float32:
            params, batch = _cast_floats(params, compute_dtype), _cast_floats(batch, compute_dtype)
        loss, (metrics, new_model_state) = task.loss(params, model_state, batch, rng, True)
        return loss.astype(jnp.float32), (metrics, new_model_state)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def accumulate(params, model_state, batch, rng):
        """Mean loss and gradient over `grad_accum` microbatches (sequential, low memory)."""
        n = tc.grad_accum
        micro = jax.tree.map(lambda x: x.reshape(n, x.shape[0] // n, *x.shape[1:]), batch)

        def body(carry, inputs):
            grads_sum, model_state = carry
            mb, i = inputs
            (loss, (metrics, model_state)), grads = grad_fn(
                params, model_state, mb, jax.random.fold_in(rng, i))
            grads_sum = jax.tree.map(jnp.add, grads_sum, grads)
            return (grads_sum, model_state), (loss, metrics)

        zeros = jax.tree.map(jnp.zeros_like, params)
        (grads, model_state), (losses, metrics) = jax.lax.scan(
            body, (zeros, model_state), (micro, jnp.arange(n)))
        grads = jax.tree.map(lambda g: g / n, grads)
        metrics = jax.tree.map(lambda m: m.mean(0), metrics)
        return (losses.mean(), (metrics, model_state)), grads

    def update(state: TrainState, batch, rng):
        if tc.grad_accum > 1:
            (loss, (metrics, model_state)), grads = accumulate(
                state.params, state.model_state, batch, rng)
        else:
            (loss, (metrics, model_state)), grads = grad_fn(
                state.params, state.model_state, batch, rng)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {**metrics, "loss": loss, "grad_norm": optax.tree.norm(grads)}
        return params, opt_state, model_state, metrics

    return update


def make_step(task: Task, tx: optax.GradientTransformation, cfg) -> Callable:
    """One optimizer step: (state, batch) -> (state, metrics)."""
    grad_step = _grad_step(task, tx, cfg) if task.update is None else None

    def step(state: TrainState, batch):
        rng = jax.random.fold_in(state.rng, state.step)
        if grad_step is not None:
            params, opt_state, model_state, metrics = grad_step(state, batch, rng)
        else:
            new, metrics = task.update(state, batch, rng, tx)
            params, opt_state, model_state = new.params, new.opt_state, new.model_state
            if "loss" not in metrics:
                raise UserError("Task.update must return a 'loss' metric (the loop's "
                                f"finiteness guard reads it); it returned {sorted(metrics)}")
        ema = state.ema_params
        if ema is not None:
            ema = optax.incremental_update(params, ema, 1.0 - cfg.train.ema_decay)
        lr = learning_rate(opt_state)  # the value this update used, from the optimizer.
        if lr is not None:
            metrics = {**metrics, "lr": lr}
        metrics = jax.tree.map(lambda m: jnp.asarray(m, jnp.float32), metrics)
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                             model_state=model_state, ema_params=ema), metrics

    return step


def init_state(task: Task, tx, cfg, first_batch) -> Callable[[jax.Array], TrainState]:
    """seed key -> fresh TrainState (jit it, or eval_shape it for the abstract state)."""
    def init(seed_key):
        init_rng, step_rng = jax.random.split(seed_key)
        # task.init may box parameters with logical axis names (nn.with_logical_partitioning):
        # the state holds them plain; a sharded run reads the names (see `state_shardings`).
        params, model_state = task.init(init_rng, first_batch)
        params = unbox(params)
        ema = params if cfg.train.ema_decay > 0 else None
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=tx.init(params), model_state=model_state,
                          ema_params=ema, rng=step_rng)
    return init


def state_shardings(task: Task, plan: ShardingPlan | None, first_batch, init, rng):
    """(abstract state, state shardings or None). On a mesh every leaf of the abstract state
    carries its sharding, so orbax restores each device's shard straight into place."""
    with without_rules():
        abstract = jax.eval_shape(init, rng)
        if plan is None:
            return abstract, None
        boxed_params = jax.eval_shape(task.init, jax.random.split(rng)[0], first_batch)[0]
    shardings = plan.state_shardings(abstract, boxed_params)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            abstract, shardings)
    return abstract, shardings


def jit_steps(task: Task, tx, cfg, plan: ShardingPlan | None, shardings):
    """K optimizer steps per call (lax.scan), state donated; sharded in and out on a mesh.

    Returns (state, metrics, finite): `finite` is one reduction over the new state (params,
    optimizer and model state, EMA), computed in the same compiled call so the loop can refuse
    to save a poisoned state without a host loop over the leaves."""
    step = make_step(task, tx, cfg)

    def steps(state, batches):
        if cfg.train.steps_per_call > 1:
            state, metrics = jax.lax.scan(step, state, batches)
        else:
            # One step without a loop around it: XLA's CPU backend runs convolutions inside a
            # while loop ~25x slower (U-Net step: 3.0 s in a scan vs 0.12 s without).
            state, metrics = step(state, jax.tree.map(lambda x: x[0], batches))
            metrics = jax.tree.map(lambda m: m[None], metrics)
        return state, metrics, all_finite(state)
    if plan is None:
        return jax.jit(steps, donate_argnums=0)
    return jax.jit(steps, donate_argnums=0,
                   in_shardings=(shardings, plan.batches_sharding()),
                   out_shardings=(shardings, plan.replicated(), plan.replicated()))


def compile_train_step(task: Task, cfg, first_batch, tx=None):
    """The compiled K-step call that `train` runs, built from shapes alone (nothing is
    initialized or run): for XLA's memory analysis."""
    return lower_train_step(task, cfg, first_batch, tx).compile()


def lower_train_step(task: Task, cfg, first_batch, tx=None):
    """`compile_train_step` before compiling: its `cost_analysis()` counts FLOPs cheaply.
    tx: as in `train` (None: from cfg.optimizer)."""
    plan = ShardingPlan.from_config(cfg)
    tx = tx if tx is not None else make_optimizer(cfg.optimizer, cfg.train.steps)
    init = init_state(task, tx, cfg, first_batch)
    abstract, shardings = state_shardings(task, plan, first_batch, init, jax.random.PRNGKey(0))
    k = cfg.train.steps_per_call
    batches = {key: jax.ShapeDtypeStruct((k,) + np.shape(x), np.asarray(x).dtype)
               for key, x in first_batch.items()}
    with plan.context() if plan else contextlib.nullcontext():
        return jit_steps(task, tx, cfg, plan, shardings).lower(abstract, batches)


def make_eval_fn(task: Task, seed: int) -> Callable:
    rng = jax.random.PRNGKey(seed)

    @jax.jit
    def eval_fn(params, model_state, batch):
        loss, (metrics, _) = task.loss(params, model_state, batch, rng, False)
        return {**metrics, "loss": loss}

    return eval_fn


def evaluate(eval_fn, params, model_state, eval_data) -> dict:
    """Metric means over `eval_data`, each batch weighted by its leading size."""
    totals, count = {}, 0
    for batch in eval_data:
        n = jax.tree.leaves(batch)[0].shape[0]
        metrics = eval_fn(params, model_state, batch)
        for k, v in metrics.items():
            totals[k] = totals.get(k, 0.0) + float(v) * n
        count += n
    return {k: v / count for k, v in totals.items()}
