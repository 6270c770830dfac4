"""Pipeline parallelism: GPipe microbatches with `jax.shard_map` and `ppermute`.

The layers are cut into S stages, one per device along the mesh's `pipeline` axis. The
batch is cut into M microbatches. At tick t, stage s works on microbatch t - s and then
hands its output to stage s + 1 with a `ppermute`; after M + S - 1 ticks the last stage has
seen every microbatch (GPipe, Huang et al. 2019). Every device runs the same program
(SPMD): stage 0 reads a fresh microbatch where the others read what their neighbour sent.

Backward comes from autodiff: the transpose of a `ppermute` is the reverse `ppermute`, so
`jax.grad` of the forward schedule *is* GPipe's backward schedule, with the same bubble.

Of the S * (M + S - 1) stage-ticks, S * M do useful work, so the idle "bubble" fraction is
(S - 1) / (M + S - 1): more microbatches, smaller bubble. 1F1B (Narayanan et al. 2021) has
the same bubble but starts each microbatch's backward as soon as it can, so a stage keeps
at most S microbatches of activations instead of M; `schedule_stats` counts both, and
pipeline_1f1b.py executes it.

Other mesh axes stay automatic inside the pipeline (`axis_names={"pipeline"}`): a stage's
weights can also be split by FSDP or tensor rules, and the microbatch by the data axis.
"""
from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from jaxcourse.errors import UserError
from jaxcourse.parallel.mesh import BATCH_AXES

AXIS = "pipeline"
_inside_stage = threading.local()  # The stage's own call of the stack must not re-enter.


def varying(a):
    """Marks a fresh per-stage value as varying over the pipeline axis: a shard_map loop
    carry must keep one type, and what a stage computes differs from stage to stage (values
    derived from sharded inputs already are varying)."""
    if AXIS in jax.typeof(a).manual_axis_type.varying:
        return a
    return jax.lax.pcast(a, (AXIS,), to="varying")


def bubble_fraction(stages: int, microbatches: int) -> float:
    """Idle fraction of a GPipe or 1F1B schedule: (S - 1) / (M + S - 1)."""
    return (stages - 1) / (microbatches + stages - 1)


def schedule_stats(stages: int, microbatches: int, schedule: str = "gpipe") -> dict:
    """Ticks, bubble and peak activations in flight per stage, by simulating the schedule.

    One tick = one forward or one backward of one microbatch on one stage (taken equal).
    GPipe runs all forwards, then all backwards; 1F1B interleaves them after a warm-up.
    """
    s_n, m_n = stages, microbatches
    if schedule not in ("gpipe", "1f1b"):
        raise UserError(f"unknown pipeline schedule {schedule!r}; choose gpipe or 1f1b")
    # Per stage, the order of work: ("F", m) / ("B", m).
    orders = []
    for s in range(s_n):
        if schedule == "gpipe":
            orders.append([("F", m) for m in range(m_n)] + [("B", m) for m in range(m_n)])
            continue
        warm = min(s_n - s - 1, m_n)
        order = [("F", m) for m in range(warm)]
        for m in range(m_n - warm):
            order += [("F", warm + m), ("B", m)]
        order += [("B", m) for m in range(m_n - warm, m_n)]
        orders.append(order)
    done: dict[tuple[str, int, int], int] = {}  # (kind, stage, mb) -> tick it finished.
    free = [0] * s_n
    pos = [0] * s_n
    peak = [0] * s_n
    live = [0] * s_n
    while any(pos[s] < len(orders[s]) for s in range(s_n)):
        progressed = False
        for s in range(s_n):
            if pos[s] == len(orders[s]):
                continue
            kind, m = orders[s][pos[s]]
            dep = (("F", s - 1, m) if s > 0 else None) if kind == "F" else (
                ("B", s + 1, m) if s < s_n - 1 else ("F", s, m))
            if dep is not None and dep not in done:
                continue
            start = max(free[s], done[dep] if dep else 0)
            done[(kind, s, m)] = free[s] = start + 1
            live[s] += 1 if kind == "F" else -1
            peak[s] = max(peak[s], live[s])
            pos[s] += 1
            progressed = True
        assert progressed, "schedule deadlocked"
    ticks = max(free)
    return {"schedule": schedule, "ticks": ticks, "bubble": 1 - 2 * m_n / ticks,
            "peak_activations": max(peak)}


def gpipe(stage_fn: Callable[[Any, Any], Any], stage_params, x_Mxb, mesh: Mesh,
          *extra):
    """Runs x through S stages: stage_fn(params_s, x, *extra) for s = 0..S-1 in order.

    stage_params: a pytree whose leaves have a leading stage axis of size S (sharded over
    the `pipeline` axis). x_Mxb: microbatches [M, b, ...]; stage_fn must keep x's shape.
    extra: arrays every stage reads (replicated). Returns the last stage's outputs [M, b, ...].
    """
    s_n = mesh.shape[AXIS]
    m_n = x_Mxb.shape[0]
    leading = {leaf.shape[0] for leaf in jax.tree.leaves(stage_params)}
    if leading != {s_n}:
        raise UserError(f"pipeline: stage parameters have leading sizes {sorted(leading)}, "
                        f"expected the {s_n} pipeline stages")

    def per_stage(params_1x, x, *extra):
        params = jax.tree.map(lambda a: a[0], params_1x)
        stage = jax.lax.axis_index(AXIS)
        shift = [(i, (i + 1) % s_n) for i in range(s_n)]

        def tick(t, carry):
            received, outputs = carry
            fresh = x[jnp.minimum(t, m_n - 1)]
            y = stage_fn(params, jnp.where(stage == 0, fresh, received), *extra)
            done = t - (s_n - 1)  # The microbatch the last stage finishes at tick t.
            keep = (stage == s_n - 1) & (done >= 0)
            outputs = jnp.where(keep, outputs.at[jnp.maximum(done, 0)].set(y), outputs)
            return jax.lax.ppermute(y, AXIS, shift), outputs

        carry = (varying(jnp.zeros_like(x[0])), varying(jnp.zeros_like(x)))
        _, outputs = jax.lax.fori_loop(0, m_n + s_n - 1, tick, carry)
        # Only the last stage holds results; the sum over stages hands them to everyone.
        return jax.lax.psum(jnp.where(stage == s_n - 1, outputs, 0), AXIS)

    extra_specs = tuple(P() for _ in extra)
    return jax.shard_map(per_stage, mesh=mesh, in_specs=(P(AXIS), P()) + extra_specs,
                         out_specs=P(), axis_names={AXIS})(stage_params, x_Mxb, *extra)


def to_microbatches(x_Bx, microbatches: int, mesh: Mesh):
    """[B, ...] -> [M, B/M, ...], keeping each device's rows on that device.

    Row r goes to microbatch r % M, so a device holding a contiguous block of rows holds
    a share of every microbatch and the data axis needs no communication.
    """
    b = x_Bx.shape[0]
    if b % microbatches:
        raise UserError(f"batch of {b} cannot be cut into {microbatches} microbatches")
    x = x_Bx.reshape(b // microbatches, microbatches, *x_Bx.shape[1:]).swapaxes(0, 1)
    live = tuple(a for a in BATCH_AXES if mesh.shape[a] > 1) or None
    return jax.lax.with_sharding_constraint(x, jax.NamedSharding(mesh, P(None, live)))


def from_microbatches(x_Mxb):
    """Inverse of `to_microbatches`."""
    m, b = x_Mxb.shape[:2]
    return x_Mxb.swapaxes(0, 1).reshape(m * b, *x_Mxb.shape[2:])


def stage_stack(layer_params, stages: int):
    """[L, ...] stacked layer parameters -> [S, L/S, ...]: stage s gets layers s*L/S...."""
    def split(a):
        if a.shape[0] % stages:
            raise UserError(f"{a.shape[0]} layers cannot be split into {stages} pipeline stages")
        return a.reshape(stages, a.shape[0] // stages, *a.shape[1:])
    return jax.tree.map(split, layer_params)


@dataclasses.dataclass(frozen=True)
class ScanStackPipeline:
    """A flax method interceptor that runs a scanned layer stack as a GPipe pipeline.

    Any module whose parameters are one `nn.scan` over layers (stacked under `scan_name`,
    with a `cfg` dataclass field holding `n_layer`) can be pipelined without editing the
    model: inside `with nn.intercept_methods(hook):`, calling the stack runs the pipeline
    instead, and the rest of the model (embedding, head) runs as usual, GSPMD-sharded.
    Used for the GPT of chapters 3-4: `ScanStackPipeline(Stack, mesh, microbatches=4)`.
    """
    module_type: type
    mesh: Mesh
    microbatches: int
    scan_name: str = "layers"

    def __call__(self, next_fun, args, kwargs, context):
        module = context.module
        if (not isinstance(module, self.module_type) or context.method_name != "__call__"
                or module.is_initializing() or getattr(_inside_stage, "on", False)):
            return next_fun(*args, **kwargs)
        if not getattr(module, "deterministic", True) and module.cfg.dropout > 0:
            raise UserError("pipeline parallelism runs without dropout; set model.dropout=0")
        if kwargs.get("cache") is not None:
            raise UserError("pipeline parallelism is for training; decode without it")
        s_n = self.mesh.shape[AXIS]
        layers = module.cfg.n_layer
        group = len(getattr(module.cfg, "pattern", ())) or 1  # layers per scanned repeat
        if (layers // group) % s_n:
            repeats = f" ({layers // group} repeats of the layer pattern)" if group > 1 else ""
            raise UserError(f"n_layer={layers}{repeats} cannot be split into {s_n} pipeline "
                            "stages")
        stage_module = module.clone(parent=None,
                                    cfg=dataclasses.replace(module.cfg, n_layer=layers // s_n))
        params = stage_stack(module.variables["params"][self.scan_name], s_n)
        x_BxTxD, positions_T = args
        cache_index = kwargs.get("cache_index")

        def stage_fn(stage_params, x, positions, index):
            variables = {"params": {self.scan_name: stage_params}}
            _inside_stage.on = True
            try:
                y, _ = stage_module.apply(variables, x, positions, cache_index=index)
            finally:
                _inside_stage.on = False
            return y

        x_Mxb = to_microbatches(x_BxTxD, self.microbatches, self.mesh)
        index = jnp.zeros((), jnp.int32) if cache_index is None else cache_index
        y_Mxb = gpipe(stage_fn, params, x_Mxb, self.mesh, positions_T, index)
        return from_microbatches(y_Mxb), None


def pipelined(module_type: type, mesh: Mesh, microbatches: int):
    """Context manager: calls to `module_type` inside run as a GPipe pipeline on `mesh`.

    Enter it *inside* the function you jit (e.g. the loss): jax caches traces by function
    and does not see flax interceptors, so a function traced without it stays unpipelined.
    """
    return nn.intercept_methods(ScanStackPipeline(module_type, mesh, microbatches))
