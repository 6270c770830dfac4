"""THE training loop, shared by every chapter.

A `Task` supplies `init` and `loss`; `train` owns the rest: optimizer, jitted K-step
calls with donated state, gradient accumulation, bf16 compute, EMA, eval, metrics,
checkpoints with exact resume, and a guard that stops on a non-finite loss.

Exactness: step s draws its randomness from fold_in(seed key, s) and its data from
`train_data[s]`, and chunk boundaries fall on the same steps whether or not a run was
interrupted, so N steps + resume to 2N reproduces a straight 2N-step run bit for bit.
"""
import contextlib
import dataclasses
import pathlib
import sys
import time
import warnings
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util
from tqdm import tqdm

from jaxcourse.errors import ConfigError, UserError
from jaxcourse.parallel.plan import ShardingPlan
from jaxcourse.parallel.rules import unbox, without_rules
from jaxcourse.train.checkpoint import Checkpointer
from jaxcourse.train.metrics import MetricsWriter
from jaxcourse.train.optim import make_optimizer, make_schedule
from jaxcourse.train.state import TrainState

PRECISIONS = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class TrainingDiverged(UserError):
    """The loss became NaN or Inf; the last good checkpoint is kept."""


@dataclasses.dataclass(frozen=True)
class Task:
    """What a chapter gives the loop.

    init(rng, batch) -> (params, model_state)
    loss(params, model_state, batch, rng, train) -> (loss, (metrics, new_model_state))
    """
    init: Callable[..., tuple[Any, Any]]
    loss: Callable[..., tuple[jax.Array, tuple[dict, Any]]]


def stack_batches(data, start: int, count: int) -> dict:
    """Batches start..start+count-1 stacked on a new leading axis (numpy)."""
    items = [data[i] for i in range(start, start + count)]
    return jax.tree.map(lambda *xs: np.stack(xs), *items)


def _cast_floats(tree, dtype):
    return jax.tree.map(
        lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def make_step(task: Task, tx: optax.GradientTransformation, cfg) -> Callable:
    """One optimizer step: (state, batch) -> (state, metrics)."""
    tc = cfg.train
    compute_dtype = PRECISIONS[tc.precision]
    schedule = make_schedule(cfg.optimizer, tc.steps)

    def loss_fn(params, model_state, batch, rng):
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

    def step(state: TrainState, batch):
        rng = jax.random.fold_in(state.rng, state.step)
        if tc.grad_accum > 1:
            (loss, (metrics, model_state)), grads = accumulate(
                state.params, state.model_state, batch, rng)
        else:
            (loss, (metrics, model_state)), grads = grad_fn(
                state.params, state.model_state, batch, rng)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = state.ema_params
        if ema is not None:
            ema = optax.incremental_update(params, ema, 1.0 - tc.ema_decay)
        metrics = {**metrics, "loss": loss, "grad_norm": optax.tree.norm(grads),
                   "lr": schedule(state.step)}
        metrics = jax.tree.map(lambda m: jnp.asarray(m, jnp.float32), metrics)
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                             model_state=model_state, ema_params=ema), metrics

    return step


def _validate(cfg, has_eval: bool) -> None:
    tc = cfg.train
    if tc.precision not in PRECISIONS:
        raise ConfigError(f"config key train.precision={tc.precision!r} is not one of "
                          f"{', '.join(PRECISIONS)}")
    for key in ("steps", "steps_per_call", "grad_accum"):
        if tc[key] < 1:
            raise ConfigError(f"config key train.{key} must be >= 1, got {tc[key]}")
    if tc.batch_size % tc.grad_accum:
        raise ConfigError(f"config key train.batch_size={tc.batch_size} is not divisible by "
                          f"train.grad_accum={tc.grad_accum}")
    if not 0.0 <= tc.ema_decay < 1.0:
        raise ConfigError(f"config key train.ema_decay must be in [0, 1), got {tc.ema_decay}")


def _flat_config(cfg) -> dict[str, str]:
    """{"optimizer.lr": "0.001", ...}: what a checkpoint remembers of the run's config."""
    flat = traverse_util.flatten_dict(cfg.to_dict(), sep=".")
    return {key: repr(value) for key, value in flat.items()}


def _warn_config_changes(saved: dict, now: dict) -> None:
    """Resuming under a different config is allowed (a larger train.steps continues a run),
    but never silent."""
    changed = [f"{k}: {saved.get(k, 'absent')} -> {now.get(k, 'absent')}"
               for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]
    if saved and changed:
        warnings.warn("resuming with a changed config: " + "; ".join(changed))


def _boundaries(cfg, start: int, has_eval: bool) -> list[int]:
    """End steps of the compiled chunks: multiples of K, eval and checkpoint steps, the end."""
    tc, every = cfg.train, cfg.checkpoint.every
    marks = set(range(tc.steps_per_call, tc.steps, tc.steps_per_call)) | {tc.steps}
    if has_eval and tc.eval_every > 0:
        marks |= set(range(tc.eval_every, tc.steps, tc.eval_every))
    if every > 0:
        marks |= set(range(every, tc.steps, every))
    return sorted(m for m in marks if m > start)


def evaluate(eval_fn, params, model_state, eval_data: Sequence) -> dict:
    """Metric means over `eval_data`, each batch weighted by its leading size."""
    totals, count = {}, 0
    for batch in eval_data:
        n = jax.tree.leaves(batch)[0].shape[0]
        metrics = eval_fn(params, model_state, batch)
        for k, v in metrics.items():
            totals[k] = totals.get(k, 0.0) + float(v) * n
        count += n
    return {k: v / count for k, v in totals.items()}


def make_eval_fn(task: Task, seed: int) -> Callable:
    rng = jax.random.PRNGKey(seed)

    @jax.jit
    def eval_fn(params, model_state, batch):
        loss, (metrics, _) = task.loss(params, model_state, batch, rng, False)
        return {**metrics, "loss": loss}

    return eval_fn


class _Progress:
    """A tqdm bar on a terminal; plain log lines otherwise (CI logs, pipes)."""

    def __init__(self, total: int, start: int):
        self.tty = sys.stderr.isatty()
        self.bar = tqdm(total=total, initial=start, dynamic_ncols=True, disable=not self.tty)
        self.total = total

    def update(self, step: int, n: int, loss: float | None):
        self.bar.update(n)
        if loss is not None:
            if self.tty:
                self.bar.set_postfix(loss=f"{loss:.4f}")
            else:
                print(f"step {step}/{self.total} loss {loss:.4f}", file=sys.stderr, flush=True)

    def close(self):
        self.bar.close()


def init_state(task: Task, tx, cfg, first_batch) -> Callable[[jax.Array], TrainState]:
    """seed key -> fresh TrainState (jit it, or eval_shape it for the abstract state)."""
    def init(seed_key):
        init_rng, step_rng = jax.random.split(seed_key)
        # task.init may box parameters with logical axis names (nn.with_logical_partitioning):
        # the state holds them plain; a sharded run reads the names (see `_sharding`).
        params, model_state = task.init(init_rng, first_batch)
        params = unbox(params)
        ema = params if cfg.train.ema_decay > 0 else None
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=tx.init(params), model_state=model_state,
                          ema_params=ema, rng=step_rng)
    return init


def _sharding(task: Task, plan: ShardingPlan | None, first_batch, init, rng):
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


def _jit_steps(task: Task, tx, cfg, plan: ShardingPlan | None, shardings):
    """K optimizer steps per call (lax.scan), state donated; sharded in and out on a mesh."""
    step = make_step(task, tx, cfg)

    def steps(state, batches):
        if cfg.train.steps_per_call > 1:
            return jax.lax.scan(step, state, batches)
        # One step without a loop around it: XLA's CPU backend runs convolutions inside a
        # while loop ~25x slower (U-Net step: 3.0 s in a scan vs 0.12 s without).
        state, metrics = step(state, jax.tree.map(lambda x: x[0], batches))
        return state, jax.tree.map(lambda m: m[None], metrics)
    if plan is None:
        return jax.jit(steps, donate_argnums=0)
    return jax.jit(steps, donate_argnums=0,
                   in_shardings=(shardings, plan.batches_sharding()),
                   out_shardings=(shardings, plan.replicated()))


def compile_train_step(task: Task, cfg, first_batch):
    """The compiled K-step call that `train` runs, built from shapes alone (nothing is
    initialized or run): for XLA's memory analysis."""
    return lower_train_step(task, cfg, first_batch).compile()


def lower_train_step(task: Task, cfg, first_batch):
    """`compile_train_step` before compiling: its `cost_analysis()` counts FLOPs cheaply."""
    plan = ShardingPlan.from_config(cfg)
    tx = make_optimizer(cfg.optimizer, cfg.train.steps)
    init = init_state(task, tx, cfg, first_batch)
    abstract, shardings = _sharding(task, plan, first_batch, init, jax.random.PRNGKey(0))
    k = cfg.train.steps_per_call
    batches = {key: jax.ShapeDtypeStruct((k,) + np.shape(x), np.asarray(x).dtype)
               for key, x in first_batch.items()}
    with plan.context() if plan else contextlib.nullcontext():
        return _jit_steps(task, tx, cfg, plan, shardings).lower(abstract, batches)


def train(task: Task, cfg, workdir: pathlib.Path, train_data,
          eval_data: Sequence | None = None) -> tuple[TrainState, dict]:
    """Trains `task` for cfg.train.steps steps, resuming from workdir's latest checkpoint."""
    _validate(cfg, eval_data is not None)
    tc, workdir = cfg.train, pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    tx = make_optimizer(cfg.optimizer, tc.steps)
    first = train_data[0]
    if tc.batch_size and jax.tree.leaves(first)[0].shape[0] % tc.grad_accum:
        raise ConfigError("batch size is not divisible by train.grad_accum")
    plan = ShardingPlan.from_config(cfg)  # None without a `mesh` section: unsharded.
    init = init_state(task, tx, cfg, first)
    rng = jax.random.PRNGKey(tc.seed)
    abstract, shardings = _sharding(task, plan, first, init, rng)
    ckpt = Checkpointer(workdir / "checkpoints", keep=cfg.checkpoint.keep)
    restored = ckpt.restore_latest(abstract)
    if restored is None:
        with without_rules():
            state, start = jax.jit(init, out_shardings=shardings)(rng), 0
    else:
        state, meta = restored
        start = int(meta["data_position"])
        print(f"resuming from {ckpt.directory} at step {start}", file=sys.stderr)
        _warn_config_changes(meta.get("config", {}), _flat_config(cfg))
    main = jax.process_index() == 0  # With several processes, one writes the logs.
    writer = MetricsWriter(workdir, resume_step=start if restored else None) if main else None

    multi_step = _jit_steps(task, tx, cfg, plan, shardings)
    eval_fn = make_eval_fn(task, tc.seed) if eval_data is not None else None
    if eval_fn is not None and plan is not None:
        eval_jit = eval_fn
        eval_fn = lambda p, s, b: eval_jit(p, s, plan.put_eval(b))  # noqa: E731
    # Mesh and logical rules are active while the steps trace (activation constraints).
    mesh_context = plan.context() if plan else contextlib.nullcontext()
    eval_metrics, train_row, last_saved = {}, {}, start if restored else None
    best_eval, stale_evals, stopped_early = float("inf"), 0, False
    progress = _Progress(tc.steps, start)
    first_end, t_first = None, None  # the first call compiles: time from its end on.

    saving = [0.0]  # Seconds spent in checkpoint saves: not step time (a sharded state's
                    # first save compiles orbax's copy programs, seconds on CPU).

    def save(at: int):
        t0 = time.perf_counter()
        ckpt.save(at, state, {"data_position": at, "config": _flat_config(cfg)})
        saving[0] += time.perf_counter() - t0

    mesh_context.__enter__()
    try:
        for end in _boundaries(cfg, start, eval_data is not None):
            n = end - start
            batches = stack_batches(train_data, start, n)
            if plan is not None:
                batches = plan.put_batches(batches)
            state, metrics = multi_step(state, batches)
            logged = (end // tc.log_every > start // tc.log_every) or end == tc.steps
            is_eval = eval_fn is not None and (
                end == tc.steps or (tc.eval_every > 0 and end % tc.eval_every == 0))
            is_ckpt = end == tc.steps or (
                cfg.checkpoint.every > 0 and end % cfg.checkpoint.every == 0)
            loss = None
            if logged or is_eval or is_ckpt:
                metrics = jax.device_get(metrics)
                if not np.all(np.isfinite(metrics["loss"])):
                    bad = start + int(np.argmin(np.isfinite(metrics["loss"])))
                    keep = f"step {last_saved}" if last_saved is not None else "none saved yet"
                    raise TrainingDiverged(
                        f"non-finite loss at step {bad + 1}; stopped. Last good checkpoint: "
                        f"{keep} in {ckpt.directory}")
                train_row = {f"train/{k}": float(np.mean(v)) for k, v in metrics.items()}
                loss = train_row["train/loss"]
            if first_end is None:
                jax.block_until_ready(state.step)
                first_end, t_first = end, time.perf_counter()
            if logged and main:
                writer.write(end, train_row)
            if is_eval:
                params = state.ema_params if state.ema_params is not None else state.params
                eval_metrics = {f"eval/{k}": v for k, v in
                                evaluate(eval_fn, params, state.model_state, eval_data).items()}
                if main:
                    writer.write(end, eval_metrics)
                if eval_metrics["eval/loss"] < best_eval:
                    best_eval, stale_evals = eval_metrics["eval/loss"], 0
                else:
                    stale_evals += 1
                stopped_early = 0 < tc.patience <= stale_evals
                is_ckpt = is_ckpt or stopped_early
            if is_ckpt:
                save(end)
                last_saved = end
            progress.update(end, n, loss)
            start = end
            if stopped_early:
                print(f"early stopping at step {end}: eval loss has not improved for "
                      f"{stale_evals} evals", file=sys.stderr)
                break
        jax.block_until_ready(state.step)
        t_end = time.perf_counter()
    finally:
        progress.close()
        ckpt.wait()
        mesh_context.__exit__(None, None, None)

    if eval_fn is not None and not eval_metrics:  # nothing left to train: report the state.
        params = state.ema_params if state.ema_params is not None else state.params
        with plan.context() if plan else contextlib.nullcontext():
            eval_metrics = {f"eval/{k}": v for k, v in
                            evaluate(eval_fn, params, state.model_state, eval_data).items()}
    if main:
        writer.plot()
    timed = (start - first_end) if first_end is not None else 0
    steps_per_second = timed / (t_end - t_first - saving[0]) if timed > 0 else float("nan")
    batch = jax.tree.leaves(first)[0].shape[0]
    final = {**train_row, **eval_metrics, "steps": int(state.step),
             "steps_per_second": steps_per_second,
             "examples_per_second": steps_per_second * batch, "stopped_early": stopped_early}
    return state, final
