"""Transformer building blocks: norms, positional encodings, embedding, MLP.

Every parameter carries logical axis names (see the preamble list: "vocab", "embed",
"mlp", ...) so the parallelism chapter can shard a model without editing it. Norms and
softmax run in float32 whatever the compute dtype, the usual mixed-precision habit.
"""
from __future__ import annotations

import functools
import math
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxcourse.errors import UserError

NORMS = ("rmsnorm", "layernorm")
# CPU flags (/proc/cpuinfo) of instructions that multiply bfloat16 natively: AVX512-BF16 and
# AMX on x86, BF16 on Arm. Without them XLA emulates a bf16 dot and it is slower than f32.
_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")
NORM_IMPLS = ("flax", "pallas")


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _bf16_matmul(x_MxK, w_KxN, x_dtype):
    del x_dtype
    return jnp.dot(x_MxK.astype(jnp.bfloat16), w_KxN.astype(jnp.bfloat16),
                   preferred_element_type=jnp.float32)


def _bf16_matmul_fwd(x_MxK, w_KxN, x_dtype):
    del x_dtype
    xb, wb = x_MxK.astype(jnp.bfloat16), w_KxN.astype(jnp.bfloat16)
    return jnp.dot(xb, wb, preferred_element_type=jnp.float32), (xb, wb)


def _unfoldable_transpose(a_MxK):
    """a.T as a real copy in memory. XLA's CPU compiler folds a plain transpose (even behind
    an optimization barrier) into the dot that consumes it, and it runs a bf16 dot that
    contracts the leading axis of its lhs in float32, ~5x slower than the same dot on a
    transposed copy (384x128 by 128x512: 380 vs 75 us). A transpose through a split axis is
    left alone. When both sizes are odd it is a plain transpose."""
    m, k = a_MxK.shape
    if k % 2 == 0:
        return jnp.transpose(a_MxK.reshape(m, k // 2, 2), (1, 2, 0)).reshape(k, m)
    if m % 2 == 0:
        return jnp.transpose(a_MxK.reshape(2, m // 2, k), (2, 0, 1)).reshape(k, m)
    return a_MxK.T


def _bf16_matmul_bwd(x_dtype, res, g_MxN):
    xb, wb = res
    gb = g_MxN.astype(jnp.bfloat16)
    dx = jax.lax.dot_general(gb, wb, (((1,), (1,)), ((), ())),  # g @ w.T, no copy needed
                             preferred_element_type=jnp.float32).astype(x_dtype)
    return dx, jnp.dot(_unfoldable_transpose(xb), gb, preferred_element_type=jnp.float32)


_bf16_matmul.defvjp(_bf16_matmul_fwd, _bf16_matmul_bwd)


def cpu_multiplies_bf16(cpuinfo: str) -> bool:
    """Whether /proc/cpuinfo text lists one of `_BF16_CPU_FLAGS`."""
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith(("flags", "Features")):
            flags.update(line.split(":", 1)[1].split())
    return any(f in flags for f in _BF16_CPU_FLAGS)


@functools.cache
def native_bf16_matmul() -> bool:
    """Whether the default backend multiplies bfloat16 natively: every GPU and TPU, and a CPU
    with one of `_BF16_CPU_FLAGS` (read on Linux; elsewhere a CPU counts as without)."""
    if jax.default_backend() != "cpu":
        return True
    try:
        return cpu_multiplies_bf16(pathlib.Path("/proc/cpuinfo").read_text(errors="replace"))
    except OSError:
        return False


def bf16_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    """A `dot_general` for flax Dense / DenseGeneral: bfloat16 operands, float32 accumulation
    and result, in the forward and in both backward matmuls (parameters, activations and
    gradients outside the matmuls stay in their own dtype). Measured on the 2-core CPU
    (chapters/ch04_llm.md): 1.9x faster GPT training steps than float32, where a bfloat16
    compute dtype for the whole model was slower. Contractions other than "last axes of lhs
    with first axes of rhs" fall back to lax.dot_general."""
    (lc, rc), (lb, rb) = dimension_numbers
    n = len(lc)
    trailing_by_leading = (tuple(lc) == tuple(range(lhs.ndim - n, lhs.ndim))
                           and tuple(rc) == tuple(range(n)))
    if lb or rb or not trailing_by_leading:
        return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision,
                                   preferred_element_type=preferred_element_type)
    k = math.prod(rhs.shape[:n])
    out = _bf16_matmul(lhs.reshape(-1, k), rhs.reshape(k, -1), jnp.dtype(lhs.dtype))
    return out.reshape(lhs.shape[:lhs.ndim - n] + rhs.shape[n:]).astype(lhs.dtype)


def partitioned(init, names):
    """An initializer whose parameter is annotated with logical axis names."""
    return nn.with_logical_partitioning(init, names)


INITS = ("xavier", "normal")


def kernel_init(kind: str):
    """The Dense kernels' initializer of attention and the MLP (`model.init`): "xavier"
    (Glorot uniform, flax's examples) or "normal", N(0, 0.02) as in GPT-2 and nanoGPT."""
    return nn.initializers.normal(stddev=0.02) if kind == "normal" else \
        nn.initializers.xavier_uniform()


def rms_norm(x, scale, eps):
    """RMSNorm (Zhang & Sennrich 2019): x / rms(x) * scale, the math of flax's nn.RMSNorm."""
    x32 = x.astype(jnp.float32)
    var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    return x32 * jax.lax.rsqrt(var + eps) * scale


def layer_norm(x, scale, bias, eps):
    """LayerNorm (Ba et al. 2016), the math of flax's nn.LayerNorm."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + eps) * scale
    return y if bias is None else y + bias


class Norm(nn.Module):
    """RMSNorm or LayerNorm; `impl` picks plain XLA ("flax") or the Pallas kernel ("pallas").

    Parameter names ("scale", "bias") match flax's own norms and do not depend on `impl`,
    so a checkpoint trained with one implementation loads into the other.
    """
    kind: str = "rmsnorm"
    impl: str = "flax"
    use_bias: bool = True  # LayerNorm only; RMSNorm has no bias by definition.
    eps: float = 1e-6
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        scale = self.param("scale", partitioned(nn.initializers.ones, ("embed",)), (d,))
        bias = None
        if self.kind == "layernorm" and self.use_bias:
            bias = self.param("bias", partitioned(nn.initializers.zeros, ("embed",)), (d,))
        if self.impl == "pallas":
            y = _pallas_norm(self.kind, x, scale, bias, self.eps)
        elif self.kind == "rmsnorm":
            y = rms_norm(x, scale, self.eps)
        else:
            y = layer_norm(x, scale, bias, self.eps)
        return y.astype(self.dtype)


def pallas_kernel(name: str):
    """pallas_kernels.<name>, the function, whether or not the package re-exports it."""
    import importlib
    try:  # Lazy: only the "pallas" switches need the kernels package.
        kernels = importlib.import_module("pallas_kernels")
        fn = getattr(kernels, name, None)
        if fn is None or not callable(fn):
            fn = getattr(importlib.import_module(f"pallas_kernels.{name}"), name)
    except (ImportError, AttributeError) as e:
        raise UserError(f"the Pallas kernel pallas_kernels.{name} is not available: {e}")
    return fn


def _pallas_norm(kind, x, scale, bias, eps):
    if kind == "rmsnorm":
        return pallas_kernel("rms_norm")(x, scale, eps)
    if bias is None:
        bias = jnp.zeros_like(scale)
    return pallas_kernel("layer_norm")(x, scale, bias, eps)


# ---------------------------------------------------------------------------------------
# Positional encodings.

def sinusoidal_table(positions, d_model: int, base: float = 10000.0):
    """Fixed sin/cos encoding of "Attention is all you need" sec. 3.5: positions [T] (or
    per-row [B, T]) -> [T, d_model] (or [B, T, d_model])."""
    half = d_model // 2
    freqs_F = jnp.exp(-math.log(base) * jnp.arange(half, dtype=jnp.float32) / half)
    angles = positions.astype(jnp.float32)[..., None] * freqs_F
    table = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)
    if d_model % 2:  # Odd widths: one zero column so the table is [..., d_model].
        table = jnp.pad(table, [(0, 0)] * (table.ndim - 1) + [(0, 1)])
    return table


def apply_rope(x_BxTxHxD, positions, base: float = 10000.0):
    """Rotary position embedding (Su et al. 2021, RoFormer sec. 3.4).

    Rotates the pairs (x_i, x_{i+D/2}) by angle pos * base^(-2i/D) (GPT-NeoX's "rotate
    half" layout), so q.k after rotation depends on the positions only through m - n.
    positions: [T], or [B, T] when every row sits at its own offset (the serving engine's
    decode slots).
    """
    d = x_BxTxHxD.shape[-1]
    if d % 2:
        raise UserError(f"RoPE needs an even head dimension, got {d}")
    half = d // 2
    freqs_F = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angles = positions.astype(jnp.float32)[..., None] * freqs_F     # [T, F] | [B, T, F]
    angles_BxTx1xF = (angles if angles.ndim == 3 else angles[None])[:, :, None, :]
    cos, sin = jnp.cos(angles_BxTx1xF), jnp.sin(angles_BxTx1xF)
    x32 = x_BxTxHxD.astype(jnp.float32)
    x1, x2 = x32[..., :half], x32[..., half:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BxTxHxD.dtype)


class Embed(nn.Module):
    """Token embedding; `attend` reuses the table as the output projection (tied weights)."""
    vocab_size: int
    d_model: int
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        init = partitioned(nn.initializers.normal(stddev=0.02), ("vocab", "embed"))
        self.embedding = self.param("embedding", init, (self.vocab_size, self.d_model))

    def __call__(self, tokens_BxT):
        # The lookup reads whole rows (the table gathered over fsdp, as FSDP does for every
        # weight): GSPMD cannot move the backward's batch-split cotangent onto an
        # embed-split table efficiently and warns "[SPMD] Involuntary full rematerialization".
        table = nn.with_logical_constraint(self.embedding, ("vocab", None))
        return jnp.take(table, tokens_BxT, axis=0).astype(self.dtype)

    def attend(self, x_BxTxD):
        return jnp.einsum("btd,vd->btv", x_BxTxD, self.embedding.astype(self.dtype))


class NoFFN(nn.Module):
    """`model.ffn="none"`: the block has no feed-forward sublayer (nor its norm), as in the
    Mamba LM, whose blocks are x + mixer(norm(x)) only."""
    skip = True

    @classmethod
    def from_config(cls, cfg, options=None, *, name, deterministic=True):
        del cfg, options, deterministic
        return cls(name=name)

    def __call__(self, x_BxTxD):
        return x_BxTxD


class MLP(nn.Module):
    """Position-wise feed-forward: GELU MLP, or SwiGLU (Shazeer 2020) with a gate branch."""
    d_model: int
    d_ff: int
    activation: str = "gelu"
    use_bias: bool = False
    dtype: jnp.dtype = jnp.float32
    dot_general: object = None     # None: lax.dot_general; or e.g. bf16_dot_general.
    weight_init: str = "xavier"    # kernel_init kind (model.init).

    slot_name = "mlp"              # The block's ffn slot (models/registry.py).

    @classmethod
    def from_config(cls, cfg, options=None, *, name, deterministic=True):
        del options, deterministic
        return cls(cfg.d_model, cfg.ff_dim, use_bias=cfg.bias, dtype=cfg.compute_dtype,
                   dot_general=cfg.dot_general, weight_init=cfg.init, name=name)

    def _dense(self, features, names, name):
        return nn.Dense(features, use_bias=self.use_bias, dtype=self.dtype, name=name,
                        dot_general=self.dot_general,
                        kernel_init=partitioned(kernel_init(self.weight_init), names),
                        bias_init=partitioned(nn.initializers.zeros, names[-1:]))

    @nn.compact
    def __call__(self, x_BxTxD):
        h_BxTxF = self._dense(self.d_ff, ("embed", "mlp"), "up")(x_BxTxD)
        if self.activation == "swiglu":
            gate_BxTxF = self._dense(self.d_ff, ("embed", "mlp"), "gate")(x_BxTxD)
            h_BxTxF = nn.silu(gate_BxTxF) * h_BxTxF
        else:
            h_BxTxF = nn.gelu(h_BxTxF)
        h_BxTxF = nn.with_logical_constraint(h_BxTxF, ("batch", "length", "mlp"))
        return self._dense(self.d_model, ("mlp", "embed"), "down")(h_BxTxF)


class SwiGLU(MLP):
    """The gated MLP of LLaMA / PaLM (Shazeer 2020): silu(x W_gate) * (x W_up), then W_down."""
    activation: str = "swiglu"
