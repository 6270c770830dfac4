"""Fused RMSNorm forward and backward as Pallas kernels.

y = x / sqrt(mean(x^2) + eps) * weight over the last axis (Zhang & Sennrich 2019,
arXiv:1910.07467, eq. 4). One program normalizes a block of whole rows in registers; the
forward saves only the per-row 1/rms, the backward recomputes x_hat from x.

Backward, with r = 1/rms, x_hat = x * r, g = dy * weight and D features:
    dx = r * (g - x_hat * mean(g * x_hat))        dweight = sum over rows of dy * x_hat
dweight is summed per row block inside the kernel and across blocks by XLA (a [blocks, D]
array), so no atomics are needed.

`impl` picks the kernels: "mosaic" (Mosaic GPU, `_norm_rows_mgpu.py`; the default on Hopper or
newer) or "triton" (this file's pallas_call kernels on the Triton lowering: the default
elsewhere, and the fallback for what Mosaic cannot take).
"""
import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import _common, _norm_rows, _norm_rows_mgpu

# ----------------------------------------------------------------------------- block sizes
BlockSizes = _norm_rows.BlockSizes
MosaicBlockSizes = _norm_rows_mgpu.MosaicBlockSizes


# ----------------------------------------------------------------------------- kernels
def _forward_kernel(x_ref, w_ref, y_ref, rstd_ref, *, spec):
    x = x_ref[...].astype(jnp.float32)          # [block_rows, width]; padded columns are 0
    rstd = lax.rsqrt(jnp.sum(x * x, axis=1) / spec.features + spec.eps)
    w = w_ref[...].astype(jnp.float32)
    y_ref[...] = (x * rstd[:, None] * w[None, :]).astype(y_ref.dtype)
    rstd_ref[...] = rstd


def _backward_kernel(x_ref, w_ref, dy_ref, rstd_ref, dx_ref, dw_ref, *, spec):
    x = x_ref[...].astype(jnp.float32)
    dy = dy_ref[...].astype(jnp.float32)
    rstd = rstd_ref[...]
    x_hat = x * rstd[:, None]
    g = dy * w_ref[...].astype(jnp.float32)[None, :]   # padded weight is 0, so g is too
    mean_gx = jnp.sum(g * x_hat, axis=1) / spec.features
    dx_ref[...] = (rstd[:, None] * (g - x_hat * mean_gx[:, None])).astype(dx_ref.dtype)
    dw_ref[...] = jnp.sum(dy * x_hat, axis=0)         # this block's share of dweight


# ----------------------------------------------------------------------------- custom VJP
@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _rms_norm(spec, x, w):
    return _rms_norm_fwd(spec, x, w)[0]


def _rms_norm_fwd(spec, x, w):
    y, rstd = _norm_rows.call(
        functools.partial(_forward_kernel, spec=spec), spec,
        [(x, "rows"), (w, "param")], [(x.dtype, "rows"), (jnp.float32, "stat")],
        name="rms_norm_fwd")
    return y, (x, w, rstd)


def _rms_norm_bwd(spec, res, dy):
    x, w, rstd = res
    dx, dw_blocks = _norm_rows.call(
        functools.partial(_backward_kernel, spec=spec), spec,
        [(x, "rows"), (w, "param"), (dy.astype(x.dtype), "rows"), (rstd, "stat")],
        [(x.dtype, "rows"), (jnp.float32, "partial")], name="rms_norm_bwd")
    return dx, dw_blocks.sum(0).astype(w.dtype)


_rms_norm.defvjp(_rms_norm_fwd, _rms_norm_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _rms_norm_mosaic(spec, x, w):
    return _norm_rows_mgpu.forward(spec, x, w)


def _rms_norm_mosaic_fwd(spec, x, w):
    return _norm_rows_mgpu.forward(spec, x, w), (x, w)


def _rms_norm_mosaic_bwd(spec, res, dy):
    x, w = res
    dx, dw_blocks = _norm_rows_mgpu.backward(spec, x, w, dy.astype(x.dtype))
    return dx, _norm_rows_mgpu.param_grad(dw_blocks, w)


_rms_norm_mosaic.defvjp(_rms_norm_mosaic_fwd, _rms_norm_mosaic_bwd)


# ----------------------------------------------------------------------------- public wrapper
def rms_norm(x, weight, eps=1e-6, *, impl=None, interpret=None, block_sizes=None):
    """RMSNorm over the last axis of x [..., D] with weight [D]; output has x's dtype.

    impl: "mosaic", "triton" or None (mosaic on compute capability >= 9.0 unless block_sizes is
    a Triton BlockSizes, else triton). A D the Mosaic kernels cannot hold in shared memory runs
    on the Triton path, with one warning only for an explicit impl="mosaic".
    interpret: None -> interpret mode off GPU (Mosaic GPU's or Pallas' interpreter), compiled on
    GPU. block_sizes: MosaicBlockSizes (mosaic) or BlockSizes (triton); None: defaults.
    """
    _norm_rows.check_args(x, {"weight": weight})
    mosaic, block_sizes = _norm_rows_mgpu.choose("rms_norm", impl, block_sizes, x, [weight])
    if x.size == 0:
        return rms_norm_reference(x, weight, eps)
    if mosaic:
        x3, (w,), spec = _norm_rows_mgpu.prepare(
            x, [weight], block_sizes, eps, False, _common.resolve_interpret(interpret))
        return _norm_rows_mgpu.unpad(_rms_norm_mosaic(spec, x3, w), x)
    x2, (w,), spec = _norm_rows.prepare(x, [weight], block_sizes, eps, interpret)
    return _norm_rows.unpad(_rms_norm(spec, x2, w), x)


# ----------------------------------------------------------------------------- reference
def rms_norm_reference(x, weight, eps=1e-6):
    """Plain-jnp RMSNorm computed in float32, returned in x's dtype: the kernel's oracle."""
    x32 = x.astype(jnp.float32)
    rstd = lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (x32 * rstd * weight.astype(jnp.float32)).astype(x.dtype)
