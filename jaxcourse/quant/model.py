"""Quantized GPT inference and quantization-aware training.

    qparams = weights.quantize_params(params, "int8")           # or int4-g32/64/128, w8a8
    model = QuantizedGPT(cfg, "int8", kv_int8=True)
    tokens = decode.generate(model, qparams, prompt, None, temperature=0.0, max_new_tokens=64)

`QuantizedGPT` has the decode interface of the GPT (`max_length`, `init_cache`, `apply`), so
the one sampler decodes it: every call dequantizes the stored int8 / packed int4 kernels
inside the compiled step and runs the float32 model. "w8a8" also quantizes the input of every
Dense layer per token (dynamic activation scales, as LLM.int8() / SmoothQuant's baseline);
with int8 weights the float matmul then equals the integer one up to float rounding
(`w8a8_matmul` is the integer version). QAT: `qat_task` trains through fake-quantized
kernels with a straight-through estimator (Bengio et al. 2013; Jacob et al. 2018).
"""
from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxcourse.models.transformer import GPT, GPTConfig, init_cache
from jaxcourse.quant import weights
from jaxcourse.train import Task


@dataclasses.dataclass(frozen=True)
class QuantizedGPT:
    """A GPT whose parameters come from `weights.quantize_params(params, scheme)`."""
    cfg: GPTConfig
    scheme: str = "int8"
    kv_int8: bool = False

    def __post_init__(self):
        weights.check_scheme(self.scheme)

    @property
    def max_length(self) -> int:
        return self.cfg.context

    def init_cache(self, batch_size: int, length: int = 0) -> dict:
        return init_cache(self.cfg, batch_size, length, jnp.int8 if self.kv_int8 else None)

    def apply(self, variables, *args, **kwargs):
        params = weights.dequantize_params(variables["params"])
        model = GPT(self.cfg)
        if self.scheme != "w8a8":
            return model.apply({"params": params}, *args, **kwargs)
        with nn.intercept_methods(_per_token_activations):
            return model.apply({"params": params}, *args, **kwargs)


def _per_token_activations(next_fun, args, kwargs, context):
    """Fake-quantizes the input of every Dense / DenseGeneral call per token to int8."""
    module = context.module
    if context.method_name != "__call__" or not isinstance(module, (nn.Dense,
                                                                    nn.DenseGeneral)):
        return next_fun(*args, **kwargs)
    axes = getattr(module, "axis", -1)
    n_in = len(axes) if isinstance(axes, tuple) else 1
    x = args[0]
    lead = x.shape[:x.ndim - n_in]
    q, scale = quantize_tokens(x.reshape(*lead, -1))
    return next_fun((q.astype(jnp.float32) * scale).reshape(x.shape).astype(x.dtype),
                    *args[1:], **kwargs)


def quantize_tokens(x_NxI):
    """(int8 [..., I], float32 scale [..., 1]): one symmetric scale per token (row)."""
    scale = jnp.max(jnp.abs(x_NxI), axis=-1, keepdims=True).astype(jnp.float32) / 127.0
    scale = jnp.where(scale == 0, 1.0, scale)
    return jnp.clip(jnp.round(x_NxI / scale), -127, 127).astype(jnp.int8), scale


def w8a8_matmul(x_NxI, w_IxO):
    """x @ w with per-token int8 activations and per-channel int8 weights: an int8 x int8
    matmul accumulated in int32, rescaled by the two scales."""
    qx, sx_Nx1 = quantize_tokens(x_NxI)
    qw, sw_O = weights.quantize_int8(w_IxO)
    acc = jax.lax.dot_general(qx, qw, (((1,), (0,)), ((), ())),
                              preferred_element_type=jnp.int32)
    return acc.astype(jnp.float32) * sx_Nx1 * sw_O


# --- QAT: fake quantization with a straight-through estimator ----------------------------

def fake_quant_ste(x, scale, qmin: int, qmax: int):
    """round(clip(x / scale)) * scale in the forward; the backward is the clip's gradient
    (1 inside [qmin, qmax] * scale, 0 outside): rounding is passed straight through."""
    y = jnp.clip(x / scale, qmin, qmax)
    return (y + jax.lax.stop_gradient(jnp.round(y) - y)) * scale


def fake_quant_kernel(w, scheme: str, n_in: int = 1):
    """The kernel as `scheme` would store it, differentiable by the STE (scales are held
    fixed in the backward: max-abs scales keep every weight inside the clip range)."""
    if scheme in ("int8", "w8a8"):
        w_IxO = w.reshape(math.prod(w.shape[:n_in]), -1)
        scale = jax.lax.stop_gradient(jnp.maximum(jnp.max(jnp.abs(w_IxO), 0), 1e-12) / 127)
        return fake_quant_ste(w_IxO, scale, -127, 127).reshape(w.shape)
    group = weights._group_of(scheme)
    i = math.prod(w.shape[:n_in])
    w_NxGxO = w.reshape(i // group, group, -1)
    scale = jax.lax.stop_gradient(
        jnp.maximum(jnp.max(jnp.abs(w_NxGxO), 1, keepdims=True), 1e-12) / 7)
    return fake_quant_ste(w_NxGxO, scale, -8, 7).reshape(w.shape)


def fake_quant_params(params, scheme: str):
    """Every Dense kernel fake-quantized (the kernels quantize_params would touch)."""
    weights.check_scheme(scheme)
    if scheme == "float32":
        return params

    def one(key_path, w):
        path = weights._path(key_path)
        if path[-1] != "kernel" or w.ndim < 2:
            return w
        return fake_quant_kernel(w, scheme, weights._in_axes(path, w.ndim))

    return jax.tree_util.tree_map_with_path(one, params)


def qat_task(task: Task, scheme: str, init_params=None) -> Task:
    """The task trained through fake-quantized kernels (the float master weights are the
    trained state); `init_params` starts from a trained model (fine-tuning)."""
    weights.check_scheme(scheme)

    def init(rng, batch):
        if init_params is None:
            return task.init(rng, batch)
        return init_params, {}

    def loss(params, model_state, batch, rng, train):
        unboxed = nn.meta.unbox(params)
        return task.loss(fake_quant_params(unboxed, scheme), model_state, batch, rng, train)

    return dataclasses.replace(task, init=init, loss=loss)
