"""Gradient barriers: a CPU compiler workaround for transformer training steps.

`with_grad_barriers(task)` makes the backward pass materialise the gradient at every block
output and MLP up-projection. The math is unchanged (identical losses); only XLA's fusion
decisions change, which on the CPU backend cut the f32 GPT step's CPU time 3x; with bf16
matmuls (layers.bf16_dot_general) the step is 1.05x faster with them than without
(chapters/ch04_llm.md, section 3). GPUs fuse well without it.
"""
from __future__ import annotations

import flax.linen as nn
import jax

from jaxcourse.models.block import Block
from jaxcourse.train import Task


@jax.custom_vjp
def grad_barrier(x):
    """Identity whose backward pass materialises the incoming gradient (optimization_barrier)."""
    return x


grad_barrier.defvjp(lambda x: (x, None), lambda _, g: (jax.lax.optimization_barrier(g),))


def _barrier_interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name != "__call__":
        return out
    if isinstance(context.module, Block):
        return (grad_barrier(out[0]), *out[1:])
    if isinstance(context.module, nn.Dense) and context.module.name in ("up", "gate"):
        return grad_barrier(out)
    return out


def with_grad_barriers(task: Task) -> Task:
    """The same task, with gradient barriers at every block output and MLP up-projection.

    Measured with XLA's CPU profiler (chapters/ch04_llm.md): XLA CPU fuses the residual-stream
    gradient (every LayerNorm backward above a layer) into each weight-gradient transpose, so
    the chain is recomputed once per consumer, quadratic in depth; and it fuses the GELU
    derivative into a strided [768,512] transpose. Materialising those two gradients cuts
    the f32 step's CPU time 3x. The math is untouched (identical losses); only fusion changes.
    """
    def loss(*args, **kwargs):
        with nn.intercept_methods(_barrier_interceptor):
            return task.loss(*args, **kwargs)
    return Task(init=task.init, loss=loss)
