"""Functional LoRA (Hu et al. 2021) for any Flax model: adapters are a separate pytree.

A frozen kernel W, viewed as a matrix [d_in, d_out], gets a low-rank update
W + (alpha / rank) * A @ B with A [d_in, r] (random) and B [r, d_out] (zeros, so training
starts exactly at the base model). Only A and B are trained. In the shared loop the task's
params are {"base": frozen model, "lora": adapters}: the base is frozen by the optimizer config
(`optimizer_settings`: zero updates, no optimizer state, never differentiated), sharded like
any parameters and saved once per checkpoint.

    lcfg = LoRAConfig(rank=8, alpha=16, targets=(r"attention/(query|value)",))
    adapters = init_adapters(rng, params, lcfg, d_model=128)
    logits = model.apply({"params": merge(params, adapters, lcfg)}, tokens)    # merged
    logits = apply_unmerged(model, params, adapters, lcfg, tokens)             # side path
    params == unmerge(merge(params, adapters, lcfg), adapters, lcfg)           # up to rounding

Kernels as matrices: a kernel either reads the residual stream (first axis == d_model: query,
key, value, MLP up; d_in is that axis) or writes it (last axis == d_model: the attention
output [heads, head_dim, d_model] and MLP down; d_in is every axis but the last).

LoRA+ (Hayou et al. 2024) trains B with a learning rate `lora_plus_ratio` times A's: a
parameter group of the loop's optimizer (optimizer.groups "^lora/.*/b$:lr=<ratio>").
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxcourse.errors import UserError
from jaxcourse.lm.params import count_params
from jaxcourse.parallel import memory
from jaxcourse.parallel.rules import unbox
from jaxcourse.train import Task, make_optimizer, make_step
from jaxcourse.train.optim import frozen_mask
from jaxcourse.train.step import init_state


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
    """(alpha / r) * A @ B reshaped to the kernel's shape."""
    return (cfg.scale * (adapter["a"] @ adapter["b"])).reshape(shape)


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
        low = (x_flat @ ad["a"].astype(x.dtype)) @ ad["b"].astype(x.dtype)
        return y + (cfg.scale * low).reshape(y.shape).astype(y.dtype)

    with nn.intercept_methods(interceptor):
        return model.apply({"params": params}, *args, **kwargs)


def optimizer_settings(cfg: LoRAConfig) -> dict:
    """optimizer.frozen / optimizer.groups for a `lora_task`: the base frozen, and B in a
    group with `lora_plus_ratio` times the learning rate (LoRA+) when the ratio is not 1."""
    groups = "" if cfg.lora_plus_ratio == 1.0 else f"^lora/.*/b$:lr={cfg.lora_plus_ratio!r}"
    return {"frozen": "^base/", "groups": groups}


def with_optimizer_settings(train_cfg, cfg: LoRAConfig):
    """A copy of the loop config `train_cfg` whose optimizer trains a `lora_task`."""
    out = ml_collections.ConfigDict(train_cfg.to_dict())
    out.optimizer.update(optimizer_settings(cfg))
    return out


def _boxed_like(shaped, values):
    """`values` in the logical-axis boxes of `shaped` (the base task's init), so a sharded
    run places the frozen base exactly like the parameters it came from."""
    is_box = lambda x: isinstance(x, nn.Partitioned)  # noqa: E731
    return jax.tree.map(lambda box, v: box.replace_boxed(v) if is_box(box) else v,
                        shaped, values, is_leaf=is_box)


def lora_task(base_task: Task, base_params, cfg: LoRAConfig, d_model: int) -> Task:
    """A task for the shared loop with params {"base": base_params, "lora": adapters}.

    Train it with `with_optimizer_settings(cfg_of_the_run, cfg)`: the base is frozen there.
    base_params=None takes the base task's own initialization (to compile without weights).
    """

    def init(rng, batch):
        shaped, _ = base_task.init(rng, batch)  # boxes (logical names) and shapes only
        base = shaped if base_params is None else _boxed_like(shaped, base_params)
        return {"base": base, "lora": init_adapters(rng, unbox(base), cfg, d_model)}, {}

    def loss(params, model_state, batch, rng, train):
        merged = merge(jax.lax.stop_gradient(params["base"]), params["lora"], cfg)
        value, (metrics, _) = base_task.loss(merged, {}, batch, rng, train)
        return value, (metrics, model_state)

    return Task(init=init, loss=loss)


def step_memory(task: Task, cfg, batch: dict) -> dict:
    """XLA's memory_analysis of the shared loop's compiled training step for `task` (compiled,
    not run): trainable (not frozen) parameters, optimizer state, arguments (params +
    optimizer state + batch), temporaries (activations, gradients) and their peak sum, in MB."""
    tx = make_optimizer(cfg.optimizer, cfg.train.steps)
    state = jax.eval_shape(init_state(task, tx, cfg, batch), jax.random.PRNGKey(0))
    compiled = jax.jit(make_step(task, tx, cfg), donate_argnums=0).lower(state, batch).compile()
    mem = memory.compiled_memory(compiled)
    frozen = frozen_mask(cfg.optimizer, state.params)
    frozen_count = 0 if frozen is None else sum(
        x.size for x, f in zip(jax.tree.leaves(state.params), jax.tree.leaves(frozen)) if f)
    return {"trainable_params": count_params(state.params) - frozen_count,
            "optimizer_state_MB": memory.bytes_per_device(state.opt_state) / 2**20,
            "arguments_MB": mem["arguments"] / 2**20, "temp_MB": mem["temporaries"] / 2**20,
            "peak_MB": mem["total"] / 2**20}


def memory_rows(model_cfg, cfg: LoRAConfig, train_cfg, batch_size: int) -> list[dict]:
    """step_memory of full fine-tuning ("sft") and LoRA ("lora") of a GPT (GPTConfig), with
    masked next-token batches of [batch_size, context]. The parameters are created inside
    `init`, which is only traced: a 124M model is compiled without being allocated."""
    from jaxcourse.lm import lm_task  # pylint: disable=import-outside-toplevel
    tokens = np.zeros((batch_size, model_cfg.context), np.int32)
    batch = {"inputs": tokens, "targets": tokens, "mask": np.ones(tokens.shape, np.float32)}
    full = lm_task(model_cfg)
    return [{"method": "sft", **step_memory(full, train_cfg, batch)},
            {"method": "lora", **step_memory(lora_task(full, None, cfg, model_cfg.d_model),
                                             with_optimizer_settings(train_cfg, cfg), batch)}]
