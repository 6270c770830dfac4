"""THE training loop, shared by every chapter.

A `Task` supplies `init` and `loss` (or its own `update`, see step.py); `train` owns the rest:
optimizer (or the `tx` it is given), jitted K-step calls with donated state, gradient
accumulation, bf16 compute, EMA, eval, metrics, checkpoints with exact resume, and a guard
that stops on a non-finite loss. A run is a list of chunk boundaries; at each one `_Run`
runs the chunk, then logs, evaluates and saves as the step asks, then `summary` reports.

Reliability: one run per workdir (jaxcourse/workdir.py's lock). Each compiled call also returns
whether the new state is finite, and nothing non-finite is saved or called good, so a diverged
run resumes from its last finite checkpoint (with changed settings, e.g. a lower lr). SIGINT or
SIGTERM let the current call finish, save, and raise `Interrupted` (exit 130 / 143 on the
command line); a second SIGINT exits at once. The checkpoint's meta keeps the last train row,
so a rerun of a finished workdir reports the real final loss.

Exactness: step s draws its randomness from fold_in(seed key, s) and its data from
`train_data[s]`, and chunk boundaries fall on the same steps whether or not a run was
interrupted, so N steps + resume to 2N reproduces a straight 2N-step run bit for bit.
"""
import contextlib
import os
import pathlib
import signal
import sys
import threading
import time
import warnings
from typing import Sequence

import jax
import numpy as np
from flax import traverse_util
from tqdm import tqdm

from jaxcourse import report
from jaxcourse import workdir as workdir_lib
from jaxcourse.errors import ConfigError, Interrupted, UserError
from jaxcourse.parallel.plan import ShardingPlan
from jaxcourse.parallel.rules import without_rules
from jaxcourse.train.checkpoint import Checkpointer
from jaxcourse.train.metrics import MetricsWriter
from jaxcourse.train.optim import make_optimizer
from jaxcourse.train.profile import StepProfiler, parse_steps
from jaxcourse.train.state import TrainState
# Re-exported: the loop's public pieces were imported from here before step.py existed.
from jaxcourse.train.step import (PRECISIONS, Task, compile_train_step, evaluate,  # noqa: F401
                                  init_state, jit_steps, lower_train_step, make_eval_fn,
                                  make_step, stack_batches, state_shardings)


class TrainingDiverged(UserError):
    """The loss or the state became NaN or Inf; the last good (finite) checkpoint is kept."""


def _validate(task: Task, cfg, has_eval: bool) -> None:
    tc = cfg.train
    if tc.precision not in PRECISIONS:
        raise ConfigError(f"config key train.precision={tc.precision!r} is not one of "
                          f"{', '.join(PRECISIONS)}")
    for key in ("steps", "steps_per_call", "grad_accum", "log_every"):
        if tc[key] < 1:
            raise ConfigError(f"config key train.{key} must be >= 1, got {tc[key]}")
    if tc.batch_size % tc.grad_accum:
        raise ConfigError(f"config key train.batch_size={tc.batch_size} is not divisible by "
                          f"train.grad_accum={tc.grad_accum}")
    if not 0.0 <= tc.ema_decay < 1.0:
        raise ConfigError(f"config key train.ema_decay must be in [0, 1), got {tc.ema_decay}")
    parse_steps(tc.get("profile_steps", ""))
    if task.loss is None and (task.update is None or has_eval):
        raise UserError("the Task has no loss: it needs one for eval and for the default "
                        "gradient step (or an `update` and no eval data)")


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


def _leading(batch) -> int:
    """The batch's leading size; 0 for a batch without arrays (an RL task samples its own)."""
    leaves = jax.tree.leaves(batch)
    return leaves[0].shape[0] if leaves else 0


class _Progress:
    """A tqdm bar on a terminal; plain log lines otherwise (CI logs, pipes)."""

    def __init__(self, total: int, start: int):
        self.tty = sys.stderr.isatty()
        self.label = report.current_stage()  # "lab optimizers / optimizer adam lr=0.003"
        self.bar = tqdm(total=total, initial=start, dynamic_ncols=True, disable=not self.tty,
                        desc=self.label or None)
        self.total = total
        self.next_line = start  # without a terminal: about 20 lines per run, and the last

    def update(self, step: int, n: int, loss: float | None):
        self.bar.update(n)
        if loss is not None:
            if self.tty:
                self.bar.set_postfix(loss=f"{loss:.4f}")
            elif step >= self.next_line or step == self.total:
                self.next_line = step + max(1, self.total // 20)
                prefix = f"[{self.label}] " if self.label else ""
                print(f"{prefix}step {step}/{self.total} loss {loss:.4f}", file=sys.stderr,
                      flush=True)

    def close(self):
        self.bar.close()


class _Run:
    """One call of `train`: the state (fresh or restored) and what acts on it per chunk."""

    def __init__(self, task: Task, cfg, workdir: pathlib.Path, train_data, eval_data, tx):
        tc = cfg.train
        workdir.mkdir(parents=True, exist_ok=True)
        self.cfg, self.train_data, self.eval_data = cfg, train_data, eval_data
        self.tx = tx if tx is not None else make_optimizer(cfg.optimizer, tc.steps)
        first = train_data[0]
        self.batch_size = _leading(first)
        if tc.batch_size and self.batch_size % tc.grad_accum:
            raise ConfigError("batch size is not divisible by train.grad_accum")
        self.plan = ShardingPlan.from_config(cfg)  # None without a `mesh` section: unsharded.
        init = init_state(task, self.tx, cfg, first)
        rng = jax.random.PRNGKey(tc.seed)
        abstract, shardings = state_shardings(task, self.plan, first, init, rng)
        self.ckpt = Checkpointer(workdir / "checkpoints", keep=cfg.checkpoint.keep)
        restored = self.ckpt.restore_latest(abstract)
        self.train_row, meta = {}, {}
        if restored is None:
            with without_rules():
                self.state, self.start = jax.jit(init, out_shardings=shardings)(rng), 0
        else:
            self.state, meta = restored
            self.start = int(meta["data_position"])
            self.train_row = meta.get("train_row", {})  # a finished run's final row.
            print(f"resuming from the last good checkpoint, step {self.start} in "
                  f"{self.ckpt.directory}", file=sys.stderr)
            _warn_config_changes(meta.get("config", {}), _flat_config(cfg))
        workdir_lib.resumable(workdir)  # the checkpoints fit: held-back config.json goes out.
        self.finite = True  # of the current state (restored ones are verified finite).
        self.last_saved = self.start if restored else None
        self.main = jax.process_index() == 0  # With several processes, one writes the logs.
        log = cfg.get("log") or {}
        self.writer = (MetricsWriter(workdir, resume_step=self.start if restored else None,
                                     tensorboard=log.get("tensorboard", False),
                                     wandb_project=log.get("wandb", ""),
                                     config=_flat_config(cfg))
                       if self.main else None)
        self.profiler = StepProfiler(tc.get("profile_steps", ""), workdir, enabled=self.main)
        self.multi_step = jit_steps(task, self.tx, cfg, self.plan, shardings)
        self.eval_fn = make_eval_fn(task, tc.seed) if eval_data is not None else None
        if self.eval_fn is not None and self.plan is not None:
            eval_jit = self.eval_fn
            self.eval_fn = lambda p, s, b: eval_jit(p, s, self.plan.put_eval(b))  # noqa: E731
        self.eval_metrics = {}
        # Early stopping's count goes into the checkpoint too: a resumed run stops where a
        # straight one would.
        best = meta.get("best_eval")
        self.best_eval = float("inf") if best is None else float(best)
        self.stale_evals, self.stopped_early = int(meta.get("stale_evals", 0)), False
        self.progress = _Progress(tc.steps, self.start)
        self.first_end, self.t_first = None, None  # the first call compiles: time from its end.
        self.saved_rate = meta.get("steps_per_second")  # the checkpoint's, for rate()
        self.t_end = None
        self.saving = 0.0  # Seconds in checkpoint saves: not step time (a sharded state's
                           # first save compiles orbax's copy programs, seconds on CPU).

    def context(self):
        """Mesh and logical rules, active while the steps trace (activation constraints)."""
        return self.plan.context() if self.plan else contextlib.nullcontext()

    def chunk(self, end: int, fetch: bool) -> float | None:
        """Runs steps start..end as one compiled call. With `fetch`, brings the metrics to the
        host, stops on a non-finite loss and returns the chunk's mean loss."""
        batches = stack_batches(self.train_data, self.start, end - self.start)
        if self.plan is not None:
            batches = self.plan.put_batches(batches)
        self.state, metrics, self.finite = self.multi_step(self.state, batches)
        loss = None
        if fetch:
            metrics = jax.device_get(metrics)
            if not np.all(np.isfinite(metrics["loss"])):
                bad = self.start + int(np.argmin(np.isfinite(metrics["loss"])))
                self.diverged(f"non-finite loss at step {bad + 1}")
            self.check_finite(end)
            self.train_row = {f"train/{k}": float(np.mean(v)) for k, v in metrics.items()}
            loss = self.train_row["train/loss"]
        if self.first_end is None:
            jax.block_until_ready(self.state.step)
            self.first_end, self.t_first = end, time.perf_counter()
        return loss

    def diverged(self, what: str):
        keep = (f"step {self.last_saved} in {self.ckpt.directory}; rerun with changed settings "
                "(e.g. a lower optimizer.lr) to resume from it" if self.last_saved is not None
                else f"none saved yet in {self.ckpt.directory} (a rerun starts afresh)")
        raise TrainingDiverged(f"{what}; stopped. Last good checkpoint: {keep}")

    def check_finite(self, end: int) -> None:
        """Stops on a non-finite state (params, optimizer state, ...): a loss computed before
        the update can be finite while the update already poisoned the state."""
        if not bool(jax.device_get(self.finite)):
            self.diverged(f"non-finite parameters or optimizer state after step {end}")

    def eval_params(self):
        s = self.state
        return s.ema_params if s.ema_params is not None else s.params

    def evaluate(self, end: int | None) -> None:
        """Eval metrics of the current state; logged at `end`, and counted for patience."""
        self.eval_metrics = {f"eval/{k}": v for k, v in evaluate(
            self.eval_fn, self.eval_params(), self.state.model_state, self.eval_data).items()}
        if end is None:
            return
        if self.main:
            self.writer.write(end, self.eval_metrics)
        if self.eval_metrics["eval/loss"] < self.best_eval:
            self.best_eval, self.stale_evals = self.eval_metrics["eval/loss"], 0
        else:
            self.stale_evals += 1
        self.stopped_early = 0 < self.cfg.train.patience <= self.stale_evals

    def save(self, end: int) -> None:
        """Checkpoint at `end`, only of a finite state; the meta keeps the last train row
        and the rate so far."""
        self.check_finite(end)
        t0 = time.perf_counter()
        rate = self.rate(end, t0)
        self.ckpt.save(end, self.state, {"data_position": end, "config": _flat_config(self.cfg),
                                         "train_row": self.train_row,
                                         "best_eval": (self.best_eval if np.isfinite(self.best_eval)
                                                       else None),
                                         "stale_evals": self.stale_evals,
                                         "steps_per_second": (rate if np.isfinite(rate)
                                                              else None)})
        self.saving += time.perf_counter() - t0
        self.last_saved = end

    def advance(self, end: int) -> None:
        """The chunk up to `end`, then what falls on `end`: log, eval, checkpoint."""
        tc, every, n = self.cfg.train, self.cfg.checkpoint.every, end - self.start
        logged = (end // tc.log_every > self.start // tc.log_every) or end == tc.steps
        is_eval = self.eval_fn is not None and (
            end == tc.steps or (tc.eval_every > 0 and end % tc.eval_every == 0))
        is_ckpt = end == tc.steps or (every > 0 and end % every == 0)
        self.profiler.before(self.start, end)
        loss = self.chunk(end, fetch=logged or is_eval or is_ckpt)
        self.profiler.after(end, self.state)
        if logged and self.main:
            self.writer.write(end, self.train_row)
        if is_eval:
            self.evaluate(end)
        if is_ckpt or self.stopped_early:
            self.save(end)
        self.progress.update(end, n, loss)
        self.start = end
        if self.stopped_early:
            print(f"early stopping at step {end}: eval loss has not improved for "
                  f"{self.stale_evals} evals", file=sys.stderr)

    def interrupt(self, signum: int, end: int):
        """After SIGINT / SIGTERM: a checkpoint at `end` (unless one is there), then stop."""
        if self.last_saved != end:
            self.save(end)
        self.ckpt.wait()
        raise Interrupted(f"{signal.Signals(signum).name} at step {end}: saved a checkpoint in "
                          f"{self.ckpt.directory}; run the same command again to resume", signum)

    def rate(self, done: int, now: float | None) -> float:
        """Steps per second after the first (compiling) call up to step `done` at time `now`,
        checkpoint saves left out. A process that timed no step (resumed with at most one
        call left) reports the rate its checkpoint recorded, else nan."""
        timed = (done - self.first_end) if self.first_end is not None else 0
        if timed > 0:
            return timed / (now - self.t_first - self.saving)
        return float("nan") if self.saved_rate is None else float(self.saved_rate)

    def summary(self) -> dict:
        """Final train/eval metrics and throughput (`rate`)."""
        if self.eval_fn is not None and not self.eval_metrics:  # nothing left to train
            with self.context():
                self.evaluate(None)
        if self.main:
            self.writer.plot()
        steps_per_second = self.rate(self.start, self.t_end)
        return {**self.train_row, **self.eval_metrics, "steps": int(self.state.step),
                "steps_per_second": steps_per_second,
                "examples_per_second": steps_per_second * self.batch_size,
                "stopped_early": self.stopped_early}


class _Preemption:
    """SIGINT / SIGTERM set `signum` (the loop saves and stops at the next chunk boundary);
    a second SIGINT exits at once. Only the main thread can take signals: elsewhere (a
    thread running `train`) this does nothing."""

    def __init__(self):
        self.signum, self.previous = None, {}

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            print("second SIGINT: exiting without saving", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        self.signum = signum  # one line comes from the Interrupted error once saved.

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def train(task: Task, cfg, workdir: pathlib.Path, train_data,
          eval_data: Sequence | None = None, tx=None) -> tuple[TrainState, dict]:
    """Trains `task` for cfg.train.steps steps, resuming from workdir's latest good checkpoint.

    tx: the optax transformation; None builds it from cfg.optimizer (`make_optimizer`).
    Raises WorkdirBusy if another run holds the workdir, TrainingDiverged on a non-finite loss
    or state, Interrupted after SIGINT / SIGTERM (a checkpoint saved first).
    """
    _validate(task, cfg, eval_data is not None)
    workdir = pathlib.Path(workdir)
    lock = (workdir_lib.locked(workdir) if jax.process_index() == 0
            else contextlib.nullcontext())
    with lock, _Preemption() as preemption:
        run = _Run(task, cfg, workdir, train_data, eval_data, tx)
        with run.context():
            try:
                for end in _boundaries(cfg, run.start, eval_data is not None):
                    run.advance(end)
                    if preemption.signum is not None:
                        run.interrupt(preemption.signum, end)
                    if run.stopped_early:
                        break
                jax.block_until_ready(run.state.step)
                run.t_end = time.perf_counter()
            finally:
                run.profiler.stop()
                run.progress.close()
                run.ckpt.wait()
                if run.writer is not None:
                    run.writer.close()
        return run.state, run.summary()
