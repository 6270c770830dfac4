"""Many PPO agents at once, in compiled chunks of updates, with checkpoints in between.

`train_agents` vmaps `run_updates` over seeds (or over any batch of `Coefs`), calls it one
chunk at a time, writes the per-update metrics (mean over agents) and saves the whole
batched `Runner` with the shared orbax Checkpointer. A resumed run restores the latest
chunk and continues with the same compiled function, so it reproduces a straight run.
"""
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxcourse.rl.ppo import Coefs, PPOFns, Runner
from jaxcourse.train import Checkpointer, MetricsWriter


def to_saveable(runner: Runner) -> Runner:
    """Typed PRNG keys become their raw uint32 data (what orbax stores)."""
    return runner.replace(rng=jax.random.key_data(runner.rng))


def from_saveable(runner: Runner) -> Runner:
    return runner.replace(rng=jax.random.wrap_key_data(runner.rng))


def init_agents(fns: PPOFns, seeds, coefs: Coefs) -> Runner:
    """One Runner per (seed, coefs) pair; coefs may be batched like seeds or shared."""
    coef_axes = 0 if jnp.ndim(coefs.clip_eps) else None
    return jax.jit(jax.vmap(fns.init, in_axes=(0, coef_axes)))(jnp.asarray(seeds), coefs)


def chunk_sizes(total: int, chunk: int) -> list[int]:
    chunk = total if chunk <= 0 else min(chunk, total)
    return [chunk] * (total // chunk) + ([total % chunk] if total % chunk else [])


def train_agents(fns: PPOFns, runner: Runner, num_updates: int, chunk: int,
                 workdir: pathlib.Path | None = None, keep: int = 2,
                 log=lambda msg: None):
    """Runs `num_updates` updates of a batch of agents in chunks.

    With a workdir, metrics go to metrics.jsonl (one row per update, mean over agents)
    and the batched Runner is checkpointed after every chunk; an existing checkpoint is
    resumed. Returns (runner, metrics {name: [agents, updates done in this call]}, timing).
    """
    ckpt = writer = None
    if workdir is not None:
        ckpt = Checkpointer(pathlib.Path(workdir) / "checkpoints", keep=keep)
        restored = ckpt.restore_latest(to_saveable(runner))
        if restored is not None:
            runner = from_saveable(restored[0])
            log(f"resumed from update {int(restored[1]['step'])}")
        writer = MetricsWriter(workdir, resume_step=int(restored[1]["step"]) if restored else None)
    done = int(np.asarray(runner.update).reshape(-1)[0])
    compile_s, run_s, history = 0.0, 0.0, []
    for size in chunk_sizes(num_updates, chunk)[_chunks_done(num_updates, chunk, done):]:
        t0 = time.perf_counter()
        if compile_s == 0.0:  # the silent part: XLA compiles the whole chunk of updates
            log(f"compiling {size} PPO updates as one program (the first chunk only) ...")
        step = _compiled_chunk(fns, runner, size)
        compile_s += time.perf_counter() - t0
        t0 = time.perf_counter()
        runner, metrics = jax.block_until_ready(step(runner))
        run_s += time.perf_counter() - t0
        metrics = jax.tree.map(np.asarray, metrics)
        history.append(metrics)
        if writer is not None:
            for i in range(size):
                writer.write(done + i + 1, {k: v[:, i].mean() for k, v in metrics.items()})
        done += size
        if ckpt is not None:
            ckpt.save(done, to_saveable(runner), {"update": done})
        log(f"update {done}/{num_updates}: return {metrics['return'][:, -1].mean():.1f}")
    if ckpt is not None:
        ckpt.wait()
    merged = {k: np.concatenate([h[k] for h in history], axis=1) for k in history[0]} \
        if history else {}
    return runner, merged, {"compile_seconds": compile_s, "run_seconds": run_s}


_COMPILED = {}


def _compiled_chunk(fns: PPOFns, runner: Runner, size: int):
    """jit(vmap(run_updates)) compiled ahead of time (so compile time is measured apart),
    cached per (functions, chunk size, shapes): a resumed run reuses the same executable."""
    shapes = str(jax.tree.map(lambda x: (x.shape, x.dtype), runner))
    key = (id(fns), size, shapes)
    if key not in _COMPILED:
        step = jax.jit(jax.vmap(fns.run_updates, in_axes=(0, None)), static_argnums=1)
        _COMPILED[key] = (fns, step.lower(runner, size).compile())  # fns kept alive with its id
    return _COMPILED[key][1]


def _chunks_done(total: int, chunk: int, done: int) -> int:
    sizes, n, acc = chunk_sizes(total, chunk), 0, 0
    while n < len(sizes) and acc + sizes[n] <= done:
        acc += sizes[n]
        n += 1
    return n
