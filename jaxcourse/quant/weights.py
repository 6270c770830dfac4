"""Post-training weight quantization of a GPT's Dense kernels, from scratch.

Schemes (`SCHEMES`):
    "int8"        symmetric int8, one scale per output channel: q = round(w / s),
                  s = max|w| / 127 over the kernel's input axes.
    "int4-g{G}"   symmetric int4 in [-8, 7], one scale per group of G input rows per output
                  channel (G = 32, 64, 128; GPTQ/AWQ-style group-wise), two values per byte.
    "w8a8"        the int8 weights above; activations are quantized per token at run time
                  (quant/model.py).

A kernel is viewed as a matrix [in, out]: Dense [D, F]; the attention projections
DenseGeneral [D, H, Dh] (in = D) and its output [H, Dh, D] (in = H * Dh). The token embedding
(tied to the output head), norms and biases stay float32.
"""
from __future__ import annotations

import math

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxcourse.errors import UserError

GROUPS = (32, 64, 128)
SCHEMES = ("float32", "int8", "w8a8", *(f"int4-g{g}" for g in GROUPS))


def check_scheme(scheme: str) -> None:
    if scheme not in SCHEMES:
        raise UserError(f"unknown quantization scheme {scheme!r}; choose one of "
                        f"{', '.join(SCHEMES)}")


def _group_of(scheme: str) -> int:
    return int(scheme.split("-g")[1]) if scheme.startswith("int4") else 0


# --- int8 per channel ------------------------------------------------------------------

def quantize_int8(w_IxO):
    """(q int8 [I, O], scale float32 [O]): per-output-channel symmetric int8."""
    scale_O = jnp.max(jnp.abs(w_IxO), axis=0) / 127.0
    scale_O = jnp.where(scale_O == 0, 1.0, scale_O)
    q = jnp.clip(jnp.round(w_IxO / scale_O), -127, 127).astype(jnp.int8)
    return q, scale_O.astype(jnp.float32)


def dequantize_int8(q_IxO, scale_O):
    return q_IxO.astype(jnp.float32) * scale_O


# --- int4 group-wise, packed two per byte ----------------------------------------------

def pack_int4(q_IxO):
    """int values in [-8, 7], I even -> uint8 [I / 2, O] (row 2i in the low nibble)."""
    if q_IxO.shape[0] % 2:
        raise UserError(f"int4 packing needs an even number of rows, got {q_IxO.shape[0]}")
    u = (q_IxO.astype(jnp.int32) & 0xF).astype(jnp.uint8)
    return u[0::2] | (u[1::2] << 4)


def unpack_int4(packed):
    """Inverse of pack_int4: uint8 [I / 2, O] -> int8 [I, O] in [-8, 7]."""
    lo = (packed & 0xF).astype(jnp.int8)
    hi = (packed >> 4).astype(jnp.int8)
    lo = jnp.where(lo > 7, lo - 16, lo)
    hi = jnp.where(hi > 7, hi - 16, hi)
    return jnp.stack([lo, hi], axis=1).reshape(-1, packed.shape[1])


def quantize_int4(w_IxO, group: int):
    """(packed uint8 [I/2, O], scale float32 [I/group, O]): symmetric int4 per group of
    `group` input rows of each output channel."""
    if group not in GROUPS:
        raise UserError(f"int4 group size must be one of {GROUPS}, got {group}")
    i, o = w_IxO.shape
    if i % group:
        raise UserError(f"int4 group size {group} does not divide the kernel's {i} input rows")
    w_NxGxO = w_IxO.reshape(i // group, group, o)
    scale_NxO = jnp.max(jnp.abs(w_NxGxO), axis=1) / 7.0
    scale_NxO = jnp.where(scale_NxO == 0, 1.0, scale_NxO)
    q = jnp.clip(jnp.round(w_NxGxO / scale_NxO[:, None]), -8, 7).reshape(i, o)
    return pack_int4(q), scale_NxO.astype(jnp.float32)


def dequantize_int4(packed, scale_NxO):
    q_IxO = unpack_int4(packed).astype(jnp.float32)
    n, o = scale_NxO.shape
    return (q_IxO.reshape(n, -1, o) * scale_NxO[:, None]).reshape(-1, o)


# --- whole parameter trees ---------------------------------------------------------------

def _in_axes(path: tuple[str, ...], ndim: int) -> int:
    """How many leading axes of a kernel are its input (contraction) axes."""
    return ndim - 1 if path[-2] == "out" and ndim == 3 else 1


def _path(key_path) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", k)) for k in key_path)


@flax.struct.dataclass
class QuantizedKernel:
    """A quantized kernel: int8 `values` [I, O] (int4: uint8 [I/2, O], two per byte), float32
    `scale` ([O]; int4: [I/group, O]); the kernel's shape and group are static."""
    values: jax.Array
    scale: jax.Array
    shape: tuple = flax.struct.field(pytree_node=False)
    group: int = flax.struct.field(pytree_node=False, default=0)

    def dequantize(self):
        if self.group:
            return dequantize_int4(self.values, self.scale).reshape(self.shape)
        return dequantize_int8(self.values, self.scale).reshape(self.shape)


def is_quantized_leaf(x) -> bool:
    return isinstance(x, QuantizedKernel)


def quantize_params(params, scheme: str):
    """The parameter tree with every Dense kernel replaced by a QuantizedKernel; everything
    else unchanged. "float32" returns params as they are."""
    check_scheme(scheme)
    if scheme == "float32":
        return params
    group = _group_of(scheme)

    def one(key_path, w):
        path = _path(key_path)
        if path[-1] != "kernel" or w.ndim < 2:
            return w
        k = _in_axes(path, w.ndim)
        w_IxO = jnp.reshape(w, (math.prod(w.shape[:k]), -1)).astype(jnp.float32)
        if group:
            values, scale = quantize_int4(w_IxO, group)
        else:
            values, scale = quantize_int8(w_IxO)
        return QuantizedKernel(values, scale, tuple(w.shape), group)

    return jax.tree_util.tree_map_with_path(one, params)


def dequantize_params(qparams):
    """Float32 parameters from a quantize_params tree (runs inside jit: on the fly)."""
    return jax.tree.map(lambda x: x.dequantize() if is_quantized_leaf(x) else x, qparams,
                        is_leaf=is_quantized_leaf)


def param_bytes(tree) -> int:
    """Bytes of every array of a (quantized) tree, scales included; sub-byte dtypes (qwix's
    jnp.int4) count their bits, as packed storage would hold them."""
    return sum(-(-int(np.prod(x.shape)) * jax.dtypes.itemsize_bits(x.dtype) // 8)
               for x in jax.tree.leaves(tree))
