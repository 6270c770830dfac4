"""Functional LoRA (Hu et al. 2021) for any Flax model: adapters are a separate pytree.

A frozen kernel W, viewed as a matrix [d_in, d_out], gets a low-rank update
W + (alpha / rank) * A @ B with A [d_in, r] (random) and B [r, d_out] (zeros, so training
starts exactly at the base model). Only A and B are trained; the base parameters are never
differentiated and never copied into the optimizer.

    lcfg = LoRAConfig(rank=8, alpha=16, targets=(r"attention/(query|value)",))
    adapters = init_adapters(rng, params, lcfg, d_model=128)
    logits = model.apply({"params": merge(params, adapters, lcfg)}, tokens)    # merged
    logits = apply_unmerged(model, params, adapters, lcfg, tokens)             # side path
    params == unmerge(merge(params, adapters, lcfg), adapters, lcfg)           # up to rounding

Kernels as matrices: a kernel either reads the residual stream (first axis == d_model: query,
key, value, MLP up; d_in is that axis) or writes it (last axis == d_model: the attention
output [heads, head_dim, d_model] and MLP down; d_in is every axis but the last).

LoRA+ (Hayou et al. 2024) trains B with a learning rate `lora_plus_ratio` times A's. Here that
is a reparametrisation rather than a second optimizer: B is stored divided by the ratio and
multiplied back in the forward pass. Adam-family updates are invariant to the gradient's scale,
so the stored B moves by ~lr per step and the effective B by ratio * lr: exactly LoRA+ for
Adam/AdamW/Lion (up to epsilon), through the shared loop's single optimizer.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxcourse.errors import UserError
from jaxcourse.lm.params import count_params
from jaxcourse.parallel import memory
from jaxcourse.train import Task, make_optimizer, make_step
from jaxcourse.train.loop import init_state


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    rank: int = 8
    alpha: float = 16.0
    # Regexes searched in "/"-joined parameter paths (the kernel's module path).
    targets: tuple[str, ...] = (r"attention/(query|key|value|out)$", r"mlp/(up|down)$")
    lora_plus_ratio: float = 1.0  # lr of B / lr of A; 1 = plain LoRA.

    def __post_init__(self):
        if self.rank < 1 or self.alpha <= 0 or self.lora_plus_ratio <= 0:
            raise UserError(f"LoRA needs rank >= 1, alpha > 0 and lora_plus_ratio > 0, got "
                            f"rank={self.rank} alpha={self.alpha} ratio={self.lora_plus_ratio}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def _path(keys) -> str:
    return "/".join(str(getattr(k, "key", k)) for k in keys)


def in_axes(shape, d_model: int) -> int:
    """How many leading kernel axes form d_in (see the module docstring)."""
    if shape[0] == d_model or shape[-1] != d_model:
        return 1
    return len(shape) - 1


def target_kernels(params, cfg: LoRAConfig) -> dict[str, Any]:
    """{module path: kernel} for every kernel whose module path matches a target regex."""
    out = {}
    for keys, leaf in jax.tree_util.tree_leaves_with_path(params):
        path = _path(keys)
        if path.endswith("/kernel") and any(re.search(t, path[:-len("/kernel")])
                                            for t in cfg.targets):
            out[path[:-len("/kernel")]] = leaf
    if not out:
        raise UserError(f"LoRA targets {cfg.targets} match no kernel of the model")
    return out


def init_adapters(rng, params, cfg: LoRAConfig, d_model: int) -> dict:
    """{module path: {"a": [d_in, r], "b": [r, d_out]}}; A ~ N(0, 1/d_in), B = 0."""
    adapters = {}
    kernels = target_kernels(params, cfg)
    for key, (path, w) in zip(jax.random.split(rng, len(kernels)), sorted(kernels.items())):
        n = in_axes(w.shape, d_model)
        d_in, d_out = math.prod(w.shape[:n]), math.prod(w.shape[n:])
        adapters[path] = {"a": jax.random.normal(key, (d_in, cfg.rank)) / math.sqrt(d_in),
                          "b": jnp.zeros((cfg.rank, d_out))}
    return adapters


def delta(adapter: dict, shape, cfg: LoRAConfig) -> jax.Array:
    """(alpha / r) * A @ B reshaped to the kernel's shape (B carries the LoRA+ factor)."""
    ab = adapter["a"] @ (adapter["b"] * cfg.lora_plus_ratio)
    return (cfg.scale * ab).reshape(shape)


def _update(params, adapters, cfg: LoRAConfig, sign: float):
    def fn(keys, w):
        path = _path(keys)
        if path.endswith("/kernel") and path[:-len("/kernel")] in adapters:
            return w + sign * delta(adapters[path[:-len("/kernel")]], w.shape, cfg).astype(w.dtype)
        return w
    return jax.tree_util.tree_map_with_path(fn, params)


def merge(params, adapters, cfg: LoRAConfig):
    """Base parameters with every adapter folded into its kernel: zero inference overhead."""
    return _update(params, adapters, cfg, 1.0)


def unmerge(merged, adapters, cfg: LoRAConfig):
    """Inverse of `merge`: subtracts the adapters back out (exact up to float rounding)."""
    return _update(merged, adapters, cfg, -1.0)


def apply_unmerged(model: nn.Module, params, adapters, cfg: LoRAConfig, *args, **kwargs):
    """model.apply with frozen kernels untouched and each adapter as a side path
    y = x W + (alpha/r) (x A) B, added by intercepting the targeted Dense layers."""

    def interceptor(next_fun, call_args, call_kwargs, context):
        module = context.module
        path = "/".join(module.path)
        if context.method_name != "__call__" or path not in adapters or not isinstance(
                module, (nn.Dense, nn.DenseGeneral)):
            return next_fun(*call_args, **call_kwargs)
        x = call_args[0]
        n_in = len(module.axis) if isinstance(getattr(module, "axis", -1), tuple) else 1
        y = next_fun(*call_args, **call_kwargs)
        ad = adapters[path]
        x_flat = x.reshape(*x.shape[:x.ndim - n_in], -1)
        low = (x_flat @ ad["a"].astype(x.dtype)) @ (ad["b"] * cfg.lora_plus_ratio).astype(x.dtype)
        return y + (cfg.scale * low).reshape(y.shape).astype(y.dtype)

    with nn.intercept_methods(interceptor):
        return model.apply({"params": params}, *args, **kwargs)


def lora_task(base_task: Task, base_params, cfg: LoRAConfig, d_model: int) -> Task:
    """A task for the shared loop whose trainable params are the adapters only.

    The frozen base rides in `model_state` (carried through the loop, never differentiated,
    returned unchanged), so it is a jit argument rather than a constant baked into the
    compiled step.
    """

    def init(rng, batch):
        del batch
        return init_adapters(rng, base_params, cfg, d_model), {"frozen": base_params}

    def loss(adapters, model_state, batch, rng, train):
        frozen = jax.lax.stop_gradient(model_state["frozen"])
        value, (metrics, _) = base_task.loss(merge(frozen, adapters, cfg), {}, batch, rng, train)
        return value, (metrics, model_state)

    return Task(init=init, loss=loss)


def step_memory(task: Task, cfg, batch: dict) -> dict:
    """XLA's memory_analysis of the shared loop's compiled training step for `task` (compiled,
    not run): trainable parameters, optimizer state, arguments (params + optimizer state +
    frozen base + batch), temporaries (activations, gradients) and their peak sum, in MB."""
    tx = make_optimizer(cfg.optimizer, cfg.train.steps)
    state = jax.eval_shape(init_state(task, tx, cfg, batch), jax.random.PRNGKey(0))
    compiled = jax.jit(make_step(task, tx, cfg), donate_argnums=0).lower(state, batch).compile()
    mem = memory.compiled_memory(compiled)
    return {"trainable_params": count_params(state.params),
            "optimizer_state_MB": memory.bytes_per_device(state.opt_state) / 2**20,
            "arguments_MB": mem["arguments"] / 2**20, "temp_MB": mem["temporaries"] / 2**20,
            "peak_MB": mem["total"] / 2**20}


def memory_rows(model_cfg, cfg: LoRAConfig, train_cfg, batch_size: int) -> list[dict]:
    """step_memory of full fine-tuning ("sft") and LoRA ("lora") of a GPT (GPTConfig), with
    masked next-token batches of [batch_size, context]. The parameters are created inside
    `init`, which is only traced: a 124M model is compiled without being allocated."""
    from jaxcourse.lm import lm_task  # pylint: disable=import-outside-toplevel
    from jaxcourse.models.transformer import GPT  # pylint: disable=import-outside-toplevel
    tokens = np.zeros((batch_size, model_cfg.context), np.int32)
    batch = {"inputs": tokens, "targets": tokens, "mask": np.ones(tokens.shape, np.float32)}
    full = lm_task(model_cfg)

    def fresh(rng, b):
        return nn.meta.unbox(GPT(model_cfg).init(rng, b["inputs"][:1])["params"])

    def lora_init(rng, b):
        base = fresh(rng, b)
        return init_adapters(rng, base, cfg, model_cfg.d_model), {"frozen": base}

    tasks = {"sft": Task(init=lambda rng, b: (fresh(rng, b), {}), loss=full.loss),
             "lora": Task(init=lora_init, loss=lora_task(full, None, cfg, model_cfg.d_model).loss)}
    return [{"method": name, **step_memory(task, train_cfg, batch)} for name, task in tasks.items()]
