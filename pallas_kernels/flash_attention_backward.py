"""FlashAttention-2 backward (Section 3.2 and Algorithm 2): a dK/dV kernel parallel over key
blocks and a dQ kernel parallel over query blocks, both recomputing P from the saved
log-sum-exp. Called by the custom VJP in flash_attention.py."""
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import _common
from pallas_kernels._flash_blocks import (LOG2_E, _block_mask, _dot_nn, _dot_nt, _dot_tn,
                                          _kv_head, _kv_steps, _q_steps, _segment_args,
                                          _segment_specs, _split, _warps)


def _probs(spec, q, k, lse, q_start, k_start, bq, bk, seg_q, seg_k):
    """Recomputed attention probabilities P [bq, bk] (Algorithm 2, line 11)."""
    s = _dot_nt(q, k) * (spec.sm_scale * LOG2_E)
    p = jnp.exp2(s - lse[:, None])
    mask = _block_mask(spec, q_start, k_start, bq, bk, seg_q, seg_k)
    return p if mask is None else jnp.where(mask, p, 0.0)


def _dkv_kernel(*refs, spec):
    """One key block against all its query blocks: dV = P^T dO, dK = scale * dS^T Q.

    Section 3.2: the backward is parallel over key blocks so dK/dV accumulate in registers
    without atomics; dQ comes from its own kernel below instead of atomic adds.
    """
    ins, sq_ref, sk_ref, (dk_ref, dv_ref) = _split(refs, 6, spec.segments)
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = ins
    bq, bk = spec.blocks.block_q_dkv, spec.blocks.block_k_dkv
    n_q = q_ref.shape[0] // bq
    k_start = pl.program_id(0) * bk
    keys = pl.ds(k_start, bk)
    k, v = k_ref[keys, :], v_ref[keys, :]
    seg_k = None if sk_ref is None else sk_ref[keys]

    def step(i, carry):
        dk, dv = carry
        rows = pl.ds(i * bq, bq)
        q, do = q_ref[rows, :], do_ref[rows, :]
        seg_q = None if sq_ref is None else sq_ref[rows]
        p = _probs(spec, q, k, lse_ref[rows], i * bq, k_start, bq, bk, seg_q, seg_k)
        dv = dv + _dot_tn(p.astype(do.dtype), do)
        ds = p * (_dot_nt(do, v) - delta_ref[rows][:, None])   # Algorithm 2, lines 13-14
        dk = dk + _dot_tn(ds.astype(q.dtype), q)
        return dk, dv

    zeros = jnp.zeros((bk, k.shape[1]), jnp.float32)
    lo, hi = _q_steps(spec, k_start, bq, bk, n_q)
    dk, dv = lax.fori_loop(lo, hi, step, (zeros, zeros))
    dk_ref[...] = (dk * spec.sm_scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(*refs, spec):
    """One query block against all its key blocks: dQ = scale * dS K."""
    ins, sq_ref, sk_ref, (dq_ref,) = _split(refs, 6, spec.segments)
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = ins
    bq, bk = spec.blocks.block_q_dq, spec.blocks.block_k_dq
    n_k = k_ref.shape[0] // bk
    q_start = pl.program_id(0) * bq
    q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]
    seg_q = None if sq_ref is None else sq_ref[...]

    def step(j, dq):
        keys = pl.ds(j * bk, bk)
        k, v = k_ref[keys, :], v_ref[keys, :]
        seg_k = None if sk_ref is None else sk_ref[keys]
        p = _probs(spec, q, k, lse, q_start, j * bk, bq, bk, seg_q, seg_k)
        ds = p * (_dot_nt(do, v) - delta[:, None])
        return dq + _dot_nn(ds.astype(k.dtype), k)

    lo, hi = _kv_steps(spec, q_start, bq, bk, n_k)
    dq = lax.fori_loop(lo, hi, step, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * spec.sm_scale).astype(dq_ref.dtype)


def _backward_dkv(spec, q, k, v, do, lse, delta, seg_q, seg_k):
    """dK, dV per query head [B, S, H, D]; the caller sums the heads of each GQA group."""
    batch, seq_q, heads, dim = q.shape
    seq_k = k.shape[1]
    bk = spec.blocks.block_k_dkv
    whole_q = pl.BlockSpec((None, seq_q, None, dim), lambda j, b, h: (b, 0, h, 0))
    kv_block = pl.BlockSpec((None, bk, None, dim), lambda j, b, h: (b, j, _kv_head(h, spec), 0))
    whole_stat = pl.BlockSpec((None, None, seq_q), lambda j, b, h: (b, h, 0))
    in_specs = [whole_q, kv_block, kv_block, whole_q, whole_stat, whole_stat] + _segment_specs(
        spec, seq_q, bk, lambda j, b, h: (b, 0), lambda j, b, h: (b, j))
    # Per-head partials are summed over the group in float32 so GQA loses no precision.
    grad_dtype = k.dtype if spec.groups == 1 else jnp.float32
    out_block = pl.BlockSpec((None, bk, None, dim), lambda j, b, h: (b, j, h, 0))
    out_shape = jax.ShapeDtypeStruct((batch, seq_k, heads, dim), grad_dtype)
    return pl.pallas_call(
        functools.partial(_dkv_kernel, spec=spec),
        grid=(seq_k // bk, batch, heads),
        in_specs=in_specs,
        out_specs=[out_block, out_block],
        out_shape=[out_shape, out_shape],
        compiler_params=_common.gpu_params(_warps(spec, dim), spec.blocks.num_stages),
        interpret=spec.interpret,
        name="flash_attention_dkv",
    )(q, k, v, do, lse, delta, *_segment_args(spec, seg_q, seg_k))


def _backward_dq(spec, q, k, v, do, lse, delta, seg_q, seg_k):
    batch, seq_q, heads, dim = q.shape
    seq_k = k.shape[1]
    bq = spec.blocks.block_q_dq
    row = pl.BlockSpec((None, bq, None, dim), lambda i, b, h: (b, i, h, 0))
    whole_kv = pl.BlockSpec((None, seq_k, None, dim), lambda i, b, h: (b, 0, _kv_head(h, spec), 0))
    stat = pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i))
    in_specs = [row, whole_kv, whole_kv, row, stat, stat] + _segment_specs(
        spec, bq, seq_k, lambda i, b, h: (b, i), lambda i, b, h: (b, 0))
    return pl.pallas_call(
        functools.partial(_dq_kernel, spec=spec),
        grid=(seq_q // bq, batch, heads),
        in_specs=in_specs,
        out_specs=row,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=_common.gpu_params(_warps(spec, dim), spec.blocks.num_stages),
        interpret=spec.interpret,
        name="flash_attention_dq",
    )(q, k, v, do, lse, delta, *_segment_args(spec, seg_q, seg_k))
