"""FlashAttention backward on Mosaic GPU: FA2 Algorithm 2 split as in FA2 Section 3.2.

* dK/dV kernel, grid over key blocks: the CTA keeps its K and V tile in SMEM, streams the query
  tiles that can see it (q, dO, lse, D; `plgpu.emit_pipeline`: TMA into a ring of swizzled
  slots) and rebuilds P^T = exp2(S^T - lse) from q, k and the saved base-2 log-sum-exp. dV and dK
  accumulate in wgmma accumulators (no atomics: one writer per key block).
* dQ kernel, grid over query blocks: q, dO, lse, D stay, K/V tiles stream, dQ accumulates.
No [T, S] matrix reaches memory. D_i = rowsum(dO_i * O_i) (Algorithm 2, line 4) is one XLA
pass. One warpgroup per CTA: warp specialisation is the forward's (flash_attention_mgpu.py).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels._flash_blocks import LOG2_E, _block_range
from pallas_kernels._mgpu import store_tile, transforms
from pallas_kernels.flash_attention_mgpu import keep_mask, matmul, rows


def _kv_head(h, spec):
    return h if spec.groups == 1 else lax.div(h, jnp.int32(spec.groups))


def _tile(rows_, dim, dtype, index_map):
    return plgpu.BlockSpec((rows_, dim), index_map, transforms=transforms(dim, dtype),
                           delay_release=1)


# ----------------------------------------------------------------------------- dK / dV
def _split(refs, n_out, segments):
    """Kernel refs -> (q, k, v, dO, lse, D, seg_q | None, seg_k | None, *outputs)."""
    if segments:
        return refs
    return refs[:6] + (None, None) + refs[6:6 + n_out]


def _dkv_kernel(*refs, spec):
    (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, sq_ref, sk_ref, dk_ref,
     dv_ref) = _split(refs, 2, spec.segments)
    bq, bkv = spec.blocks.block_q_dkv, spec.blocks.block_kv_dkv
    dim, dtype = q_ref.shape[3], q_ref.dtype
    kv_i, h, b = lax.axis_index("kv"), lax.axis_index("heads"), lax.axis_index("batch")
    k0 = kv_i * bkv
    # Query tiles that can keep a key of this block (causal / window skip).
    lo, hi = _block_range(k0, bkv, spec.right, spec.left, bq, q_ref.shape[1] // bq)
    scale = spec.sm_scale * LOG2_E
    tr = transforms(dim, dtype)

    def body(k_smem, v_smem, pt_smem, dst_smem, sk_smem, bars):
        keys = (b, pl.ds(k0, bkv), _kv_head(h, spec))
        plgpu.copy_gmem_to_smem(k_ref.at[keys], k_smem, bars.at[0])
        plgpu.copy_gmem_to_smem(v_ref.at[keys], v_smem, bars.at[1])
        plgpu.barrier_wait(bars.at[0])
        plgpu.barrier_wait(bars.at[1])
        seg_k = None
        if spec.segments:
            plgpu.copy_gmem_to_smem(sk_ref.at[b, pl.ds(k0, bkv)], sk_smem, bars.at[2])
            plgpu.barrier_wait(bars.at[2])
            seg_k = plgpu.load(sk_smem, layout=plgpu.Layout.WGMMA.reduce(1))

        def accumulate(dk_acc, dv_acc):
            def step(idx, q_smem, do_smem, lse_smem, delta_smem, *sq_smem):
                q0 = (lo + idx[0]) * bq
                st = matmul(k_smem, q_smem.T, (bkv, bq)) * scale          # S^T [keys, queries]
                lse = plgpu.load(lse_smem, layout=plgpu.Layout.WGMMA.reduce(0))
                pt = jnp.exp2(st - rows(lse, st.shape, 1))                # Algorithm 2, line 11
                seg_q = (plgpu.load(sq_smem[0], layout=plgpu.Layout.WGMMA.reduce(0))
                         if spec.segments else None)
                keep = keep_mask(spec, k0, q0, st.shape, transposed=True, seg_rows=seg_k,
                                 seg_cols=seg_q)
                if keep is not None:
                    pt = jnp.where(keep, pt, 0.0)
                pt_smem[...] = pt.astype(dtype)
                plgpu.commit_smem()
                plgpu.wgmma(dv_acc, pt_smem, do_smem)                     # dV += P^T dO (line 12)
                dpt = matmul(v_smem, do_smem.T, (bkv, bq))                # dP^T = V dO^T (line 13)
                delta = plgpu.load(delta_smem, layout=plgpu.Layout.WGMMA.reduce(0))
                dst = pt * (dpt - rows(delta, pt.shape, 1))               # dS^T (line 14)
                dst_smem[...] = dst.astype(dtype)
                plgpu.commit_smem()
                plgpu.wgmma(dk_acc, dst_smem, q_smem)                     # dK += dS^T Q (line 16)

            stat = plgpu.BlockSpec((bq,), lambda i: (lo + i,))
            plgpu.emit_pipeline(
                step, grid=(jnp.maximum(hi - lo, 0),),
                in_specs=[_tile(bq, dim, dtype, lambda i: (lo + i, 0)),
                          _tile(bq, dim, dtype, lambda i: (lo + i, 0)), stat, stat]
                + [stat] * spec.segments,
                max_concurrent_steps=spec.blocks.bwd_stages,
            )(q_ref.at[b, :, h, :], do_ref.at[b, :, h, :], lse_ref.at[b, h, :],
              delta_ref.at[b, h, :], *([sq_ref.at[b, :]] if spec.segments else []))
            return dk_acc[...], dv_acc[...]
        # Register accumulators get their own scope (the interpreter cannot mix them with SMEM).
        return pl.run_scoped(accumulate, plgpu.ACC((bkv, dim), jnp.float32),
                             plgpu.ACC((bkv, dim), jnp.float32))

    dk, dv = pl.run_scoped(
        body, plgpu.SMEM((bkv, dim), dtype, transforms=tr),
        plgpu.SMEM((bkv, dim), dtype, transforms=tr),
        plgpu.SMEM((bkv, bq), dtype, transforms=transforms(bq, dtype)),
        plgpu.SMEM((bkv, bq), dtype, transforms=transforms(bq, dtype)),
        plgpu.SMEM((bkv,), jnp.int32) if spec.segments else None,
        plgpu.Barrier(num_barriers=2 + spec.segments))
    store_tile(dk * spec.sm_scale, dk_ref.at[b, pl.ds(k0, bkv), h])
    store_tile(dv, dv_ref.at[b, pl.ds(k0, bkv), h])


# ----------------------------------------------------------------------------- dQ
def _dq_kernel(*refs, spec):
    (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, sq_ref, sk_ref,
     dq_ref) = _split(refs, 1, spec.segments)
    bq, bkv = spec.blocks.block_q_dq, spec.blocks.block_kv_dq
    dim, dtype = q_ref.shape[3], q_ref.dtype
    q_i, h, b = lax.axis_index("q"), lax.axis_index("heads"), lax.axis_index("batch")
    q0 = q_i * bq
    lo, hi = _block_range(q0, bq, spec.left, spec.right, bkv, k_ref.shape[1] // bkv)
    scale = spec.sm_scale * LOG2_E
    tr = transforms(dim, dtype)

    def body(q_smem, do_smem, lse_smem, delta_smem, ds_smem, sq_smem, bars):
        rows_ = (b, pl.ds(q0, bq), h)
        plgpu.copy_gmem_to_smem(q_ref.at[rows_], q_smem, bars.at[0])
        plgpu.copy_gmem_to_smem(do_ref.at[rows_], do_smem, bars.at[1])
        plgpu.copy_gmem_to_smem(lse_ref.at[b, h, pl.ds(q0, bq)], lse_smem, bars.at[2])
        plgpu.copy_gmem_to_smem(delta_ref.at[b, h, pl.ds(q0, bq)], delta_smem, bars.at[3])
        for i in range(4):
            plgpu.barrier_wait(bars.at[i])
        lse = plgpu.load(lse_smem, layout=plgpu.Layout.WGMMA.reduce(1))
        delta = plgpu.load(delta_smem, layout=plgpu.Layout.WGMMA.reduce(1))
        seg_q = None
        if spec.segments:
            plgpu.copy_gmem_to_smem(sq_ref.at[b, pl.ds(q0, bq)], sq_smem, bars.at[4])
            plgpu.barrier_wait(bars.at[4])
            seg_q = plgpu.load(sq_smem, layout=plgpu.Layout.WGMMA.reduce(1))

        def accumulate(dq_acc):
            def step(idx, k_smem, v_smem, *sk_smem):
                k_start = (lo + idx[0]) * bkv
                s = matmul(q_smem, k_smem.T, (bq, bkv)) * scale
                p = jnp.exp2(s - rows(lse, s.shape, 0))
                seg_k = (plgpu.load(sk_smem[0], layout=plgpu.Layout.WGMMA.reduce(0))
                         if spec.segments else None)
                keep = keep_mask(spec, q0, k_start, s.shape, seg_rows=seg_q, seg_cols=seg_k)
                if keep is not None:
                    p = jnp.where(keep, p, 0.0)
                dp = matmul(do_smem, v_smem.T, (bq, bkv))
                ds = p * (dp - rows(delta, p.shape, 0))
                ds_smem[...] = ds.astype(dtype)
                plgpu.commit_smem()
                plgpu.wgmma(dq_acc, ds_smem, k_smem)                      # dQ += dS K (line 15)

            plgpu.emit_pipeline(
                step, grid=(jnp.maximum(hi - lo, 0),),
                in_specs=[_tile(bkv, dim, dtype, lambda j: (lo + j, 0)),
                          _tile(bkv, dim, dtype, lambda j: (lo + j, 0))]
                + [plgpu.BlockSpec((bkv,), lambda j: (lo + j,))] * spec.segments,
                max_concurrent_steps=spec.blocks.bwd_stages,
            )(k_ref.at[b, :, _kv_head(h, spec), :], v_ref.at[b, :, _kv_head(h, spec), :],
              *([sk_ref.at[b, :]] if spec.segments else []))
            return dq_acc[...]
        return pl.run_scoped(accumulate, plgpu.ACC((bq, dim), jnp.float32))

    dq = pl.run_scoped(
        body, plgpu.SMEM((bq, dim), dtype, transforms=tr),
        plgpu.SMEM((bq, dim), dtype, transforms=tr),
        plgpu.SMEM((bq,), jnp.float32), plgpu.SMEM((bq,), jnp.float32),
        plgpu.SMEM((bq, bkv), dtype, transforms=transforms(bkv, dtype)),
        plgpu.SMEM((bq,), jnp.int32) if spec.segments else None,
        plgpu.Barrier(num_barriers=4 + spec.segments))
    store_tile(dq * spec.sm_scale, dq_ref.at[b, pl.ds(q0, bq), h])


# ----------------------------------------------------------------------------- entry
def _call(body, out_type, grid, names, spec, *args):
    return plgpu.kernel(body, out_type=out_type, grid=grid, grid_names=names,
                        compiler_params=plgpu.CompilerParams(approx_math=True),
                        interpret=spec.interpret)(*args)


def backward(spec, q, k, v, o, lse, seg_q, seg_k, do):
    """Padded residuals and dO -> (dq, dk, dv) in the padded shapes."""
    batch, seq_q, heads, dim = q.shape
    seq_k, kv_heads = k.shape[1], k.shape[2]
    bs = spec.blocks
    # D_i = rowsum(dO_i * O_i) (Algorithm 2, line 4): one elementwise pass, left to XLA.
    delta = jnp.einsum("bthd,bthd->bht", o.astype(jnp.float32), do.astype(jnp.float32))
    args = (q, k, v, do, lse, delta) + ((seg_q, seg_k) if spec.segments else ())
    # Per-query-head dK/dV, summed over each GQA group below in float32.
    grad_dtype = k.dtype if spec.groups == 1 else jnp.float32
    per_head = jax.ShapeDtypeStruct((batch, seq_k, heads, dim), grad_dtype)
    dk, dv = _call(functools.partial(_dkv_kernel, spec=spec), (per_head, per_head),
                   (seq_k // bs.block_kv_dkv, heads, batch), ("kv", "heads", "batch"), spec, *args)
    dq = _call(functools.partial(_dq_kernel, spec=spec), jax.ShapeDtypeStruct(q.shape, q.dtype),
               (seq_q // bs.block_q_dq, heads, batch), ("q", "heads", "batch"), spec, *args)
    if spec.groups > 1:
        dk = dk.reshape(batch, seq_k, kv_heads, spec.groups, dim).sum(3).astype(k.dtype)
        dv = dv.reshape(batch, seq_k, kv_heads, spec.groups, dim).sum(3).astype(v.dtype)
    return dq, dk, dv
