"""Fused LayerNorm forward and backward as Pallas kernels.

y = (x - mean) / sqrt(var + eps) * weight + bias over the last axis (Ba, Kiros & Hinton
2016, arXiv:1607.06450, eq. 4). One program normalizes a block of whole rows in registers;
the forward saves per-row mean and 1/std, the backward recomputes x_hat from x.

Backward, with r = 1/std, x_hat = (x - mean) * r, g = dy * weight:
    dx = r * (g - mean(g) - x_hat * mean(g * x_hat))
    dweight = sum over rows of dy * x_hat          dbias = sum over rows of dy
The parameter gradients are summed per row block in the kernel and across blocks by XLA.

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
def _centered(x, mean, spec):
    """x - mean on real columns, 0 on the padding (which would otherwise count -mean)."""
    real = jnp.arange(x.shape[1], dtype=jnp.int32)[None, :] < spec.features
    return jnp.where(real, x - mean[:, None], 0.0)


def _forward_kernel(x_ref, w_ref, b_ref, y_ref, mean_ref, rstd_ref, *, spec):
    x = x_ref[...].astype(jnp.float32)          # [block_rows, width]; padded columns are 0
    mean = jnp.sum(x, axis=1) / spec.features
    xc = _centered(x, mean, spec)
    rstd = lax.rsqrt(jnp.sum(xc * xc, axis=1) / spec.features + spec.eps)
    w = w_ref[...].astype(jnp.float32)[None, :]
    b = b_ref[...].astype(jnp.float32)[None, :]
    y_ref[...] = (xc * rstd[:, None] * w + b).astype(y_ref.dtype)
    mean_ref[...] = mean
    rstd_ref[...] = rstd


def _backward_kernel(x_ref, w_ref, dy_ref, mean_ref, rstd_ref, dx_ref, dw_ref, db_ref, *,
                     spec):
    x = x_ref[...].astype(jnp.float32)
    dy = dy_ref[...].astype(jnp.float32)
    rstd = rstd_ref[...]
    x_hat = _centered(x, mean_ref[...], spec) * rstd[:, None]
    g = dy * w_ref[...].astype(jnp.float32)[None, :]   # padded weight is 0, so g is too
    mean_g = jnp.sum(g, axis=1) / spec.features
    mean_gx = jnp.sum(g * x_hat, axis=1) / spec.features
    # Padded columns of dx come out as -rstd * mean_g; the wrapper slices them away.
    dx = rstd[:, None] * (g - mean_g[:, None] - x_hat * mean_gx[:, None])
    dx_ref[...] = dx.astype(dx_ref.dtype)
    dw_ref[...] = jnp.sum(dy * x_hat, axis=0)
    db_ref[...] = jnp.sum(dy, axis=0)


# ----------------------------------------------------------------------------- custom VJP
@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _layer_norm(spec, x, w, b):
    return _layer_norm_fwd(spec, x, w, b)[0]


def _layer_norm_fwd(spec, x, w, b):
    y, mean, rstd = _norm_rows.call(
        functools.partial(_forward_kernel, spec=spec), spec,
        [(x, "rows"), (w, "param"), (b, "param")],
        [(x.dtype, "rows"), (jnp.float32, "stat"), (jnp.float32, "stat")],
        name="layer_norm_fwd")
    return y, (x, w, b, mean, rstd)


def _layer_norm_bwd(spec, res, dy):
    x, w, b, mean, rstd = res
    dx, dw_blocks, db_blocks = _norm_rows.call(
        functools.partial(_backward_kernel, spec=spec), spec,
        [(x, "rows"), (w, "param"), (dy.astype(x.dtype), "rows"), (mean, "stat"),
         (rstd, "stat")],
        [(x.dtype, "rows"), (jnp.float32, "partial"), (jnp.float32, "partial")],
        name="layer_norm_bwd")
    return dx, dw_blocks.sum(0).astype(w.dtype), db_blocks.sum(0).astype(b.dtype)


_layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _layer_norm_mosaic(spec, x, w, b):
    return _norm_rows_mgpu.forward(spec, x, w, b)


def _layer_norm_mosaic_fwd(spec, x, w, b):
    return _norm_rows_mgpu.forward(spec, x, w, b), (x, w, b)


def _layer_norm_mosaic_bwd(spec, res, dy):
    x, w, b = res
    dx, dw_blocks, db_blocks = _norm_rows_mgpu.backward(spec, x, w, dy.astype(x.dtype))
    return dx, _norm_rows_mgpu.param_grad(dw_blocks, w), _norm_rows_mgpu.param_grad(db_blocks, b)


_layer_norm_mosaic.defvjp(_layer_norm_mosaic_fwd, _layer_norm_mosaic_bwd)


# ----------------------------------------------------------------------------- public wrapper
def layer_norm(x, weight, bias, eps=1e-6, *, impl=None, interpret=None, block_sizes=None):
    """LayerNorm over the last axis of x [..., D] with weight, bias [D]; x's dtype out.

    impl: "mosaic", "triton" or None (mosaic on compute capability >= 9.0 unless block_sizes is
    a Triton BlockSizes, else triton). A D the Mosaic kernels cannot hold in shared memory runs
    on the Triton path, with one warning only for an explicit impl="mosaic".
    interpret: None -> interpret mode off GPU (Mosaic GPU's or Pallas' interpreter), compiled on
    GPU. block_sizes: MosaicBlockSizes (mosaic) or BlockSizes (triton); None: defaults.
    """
    _norm_rows.check_args(x, {"weight": weight, "bias": bias})
    mosaic, block_sizes = _norm_rows_mgpu.choose("layer_norm", impl, block_sizes, x,
                                                 [weight, bias])
    if x.size == 0:
        return layer_norm_reference(x, weight, bias, eps)
    if mosaic:
        x3, (w, b), spec = _norm_rows_mgpu.prepare(
            x, [weight, bias], block_sizes, eps, True, _common.resolve_interpret(interpret))
        return _norm_rows_mgpu.unpad(_layer_norm_mosaic(spec, x3, w, b), x)
    x2, (w, b), spec = _norm_rows.prepare(x, [weight, bias], block_sizes, eps, interpret)
    return _norm_rows.unpad(_layer_norm(spec, x2, w, b), x)


# ----------------------------------------------------------------------------- reference
def layer_norm_reference(x, weight, bias, eps=1e-6):
    """Plain-jnp LayerNorm computed in float32, returned in x's dtype: the kernel's oracle."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * lax.rsqrt(var + eps) * weight.astype(jnp.float32)
    return (y + bias.astype(jnp.float32)).astype(x.dtype)
