"""Grouped matmul (the semantics of `jax.lax.ragged_dot`) as Mosaic GPU kernels.

    out[m] = lhs[m] @ rhs[g(m)]     g(m): the group of row m; rows of lhs are consecutive groups

Rows at or past sum(group_sizes) belong to no group and give 0; a sum above M clips the last
groups at M. Both as `lax.ragged_dot` does on CPU.

Two kernels, both `plgpu.kernel` (Mosaic GPU, Warpgroup semantics, one CTA per output tile):

* `_gmm` (forward, and dlhs with the weights transposed). The grid is (N tiles, M tiles). The
  wrapper lists the non-empty groups in row order and computes, per M tile, the first and last
  of them with rows in it (a searchsorted over the cumulative sizes). The CTA loops over those; for each it streams K-slices of
  its lhs tile and of rhs[g] into swizzled SMEM with `plgpu.emit_pipeline` (TMA, a few stages)
  and accumulates with wgmma into a register accumulator, then keeps only the rows of that group
  (an iota mask) in a running float32 sum. A tile inside one group does one matmul; a tile that
  straddles j groups does j. Each output tile has exactly one writer: no atomics, no masked stores.
* `_tgmm` (drhs[g] = lhs[g rows]^T @ grad[g rows]). The grid is (N tiles, K tiles, G). The CTA
  pipelines over the M tiles that hold rows of group g and accumulates lhs_tile^T @ grad_tile.
  In the first and last of those tiles, lhs rows of other groups are zeroed in SMEM before the
  wgmma. An empty group writes zeros.

The wrapper zero-pads M, K and N to whole blocks (padded rows/columns contribute exact zeros)
and slices the result, so any shape runs. What runs where is in pallas_kernels/README.md.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels._common import (KernelInputError, check_float, pad_to, resolve_interpret,
                                    round_up)
from pallas_kernels._mgpu import store_tile, transforms

# wgmma works on 64-row warpgroup tiles and at most 256 columns. Every block is a wgmma row
# count somewhere (block_k is drhs's, block_n dlhs's), hence multiples of 64 throughout; 64
# elements are >= 128 bytes, the widest SMEM swizzle, for every dtype.
HW_TILE = 64
MAX_N = 256


# ----------------------------------------------------------------------------- block sizes
@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiles of both kernels (first guess for H100/H200, not tuned on hardware)."""
    block_m: int = 128        # rows of lhs per CTA (forward) / per pipeline step (drhs)
    block_n: int = 128        # output columns per CTA
    block_k: int = 64         # contraction slice per pipeline step (forward), rows of drhs per CTA
    num_stages: int = 4       # SMEM pipeline depth (TMA copies in flight)

    def validate(self):
        for name in ("block_m", "block_n", "block_k"):
            value = getattr(self, name)
            if value <= 0 or value % HW_TILE or (name != "block_m" and value > MAX_N):
                raise KernelInputError(
                    f"block_sizes.{name}={value} must be a positive multiple of {HW_TILE} "
                    f"(the wgmma tile)" + ("" if name == "block_m" else f", at most {MAX_N}"))
        if self.num_stages < 2:
            # Each wgmma reads SMEM asynchronously; a slot is refilled only one step later.
            raise KernelInputError(f"block_sizes.num_stages={self.num_stages} must be >= 2")


def default_block_sizes(dtype) -> BlockSizes:
    """128 x 128 x 64 tiles; 4 pipeline stages for 16-bit inputs, 2 for float32 (SMEM)."""
    return BlockSizes(num_stages=2 if jnp.dtype(dtype).itemsize == 4 else 4)


def _rows_mask(first_row, shape, lo, hi, dim=0):
    """float32 1.0 where first_row + iota(dim) is in [lo, hi), in the wgmma register layout."""
    rows = first_row + plgpu.layout_cast(lax.broadcasted_iota(jnp.int32, shape, dim),
                                         plgpu.Layout.WGMMA)
    return ((rows >= lo) & (rows < hi)).astype(jnp.float32)


def _params():
    return plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup)


# ----------------------------------------------------------------------------- kernels
def _operand_spec(k_major: bool, block_k: int, block_n: int, index_map, dtype):
    """BlockSpec of wgmma's second operand, [K, N] or, k_major, stored [N, K]."""
    if k_major:
        return plgpu.BlockSpec((block_n, block_k), lambda i: index_map(i)[::-1],
                               transforms=transforms(block_k, dtype), delay_release=1)
    return plgpu.BlockSpec((block_k, block_n), index_map,
                           transforms=transforms(block_n, dtype), delay_release=1)


def _gmm(lhs, rhs, tiles, bs: BlockSizes, interpret, k_major: bool):
    """[Mp, Kp] x [G, Kp, Np] (k_major: [G, Np, Kp]) -> [Mp, Np], padded to whole blocks."""
    m, k = lhs.shape
    n = rhs.shape[1 if k_major else 2]
    bm, bn, bk = bs.block_m, bs.block_n, bs.block_k
    lhs_t = transforms(bk, lhs.dtype)

    def body(group_ref, starts_ref, ends_ref, first_ref, last_ref, lhs_ref, rhs_ref, out_ref):
        ni, mi = lax.axis_index("n"), lax.axis_index("m")

        def one_group(j, total):
            g = group_ref[j]
            def matmul(acc_ref):
                plgpu.emit_pipeline(
                    lambda _, l_smem, r_smem: plgpu.wgmma(
                        acc_ref, l_smem, r_smem.T if k_major else r_smem),
                    grid=(k // bk,),
                    in_specs=[
                        plgpu.BlockSpec((bm, bk), lambda kk: (mi, kk), transforms=lhs_t,
                                        delay_release=1),
                        _operand_spec(k_major, bk, bn, lambda kk: (kk, ni), rhs.dtype)],
                    max_concurrent_steps=bs.num_stages,
                )(lhs_ref, rhs_ref.at[g])
                return acc_ref[...]
            acc = pl.run_scoped(matmul, plgpu.ACC((bm, bn)))
            return total + acc * _rows_mask(mi * bm, (bm, bn), starts_ref[j], ends_ref[j])

        zero = plgpu.layout_cast(jnp.zeros((bm, bn), jnp.float32), plgpu.Layout.WGMMA)
        total = lax.fori_loop(first_ref[mi], last_ref[mi] + 1, one_group, zero)
        store_tile(total, out_ref.at[pl.ds(mi * bm, bm), pl.ds(ni * bn, bn)])

    kernel = plgpu.kernel(body, out_type=jax.ShapeDtypeStruct((m, n), lhs.dtype),
                          grid=(n // bn, m // bm), grid_names=("n", "m"),
                          compiler_params=_params(), interpret=interpret)
    return kernel(*tiles, lhs, rhs)


def _tgmm(lhs_t, grad, starts, ends, bs: BlockSizes, interpret, k_major: bool):
    """drhs[g] = lhs[rows of g]^T @ grad[rows of g] -> [G, Kp, Np].

    lhs comes as lhs^T [Kp, Mp] and, k_major, grad as grad^T [Np, Mp] (else [Mp, Np]): wgmma
    on 32-bit operands (tf32) needs both with the contraction (here M) fastest in SMEM.
    """
    k, n, g_count = lhs_t.shape[0], grad.shape[0 if k_major else 1], starts.shape[0]
    bm, bn, bk = bs.block_m, bs.block_n, bs.block_k
    lhs_tr = transforms(bm, lhs_t.dtype)

    def body(starts_ref, ends_ref, lhs_ref, grad_ref, out_ref):
        ni, ki, g = lax.axis_index("n"), lax.axis_index("k"), lax.axis_index("g")
        lo, hi = starts_ref[g], ends_ref[g]
        tile0 = lo // bm
        n_tiles = jnp.where(hi > lo, (hi + bm - 1) // bm - tile0, 0)

        def matmul(acc_ref):
            def step(idx, l_smem, g_smem):
                tile = tile0 + idx[0]

                # Only the group's first and last M tile can hold rows of other groups.
                @pl.when((tile * bm < lo) | ((tile + 1) * bm > hi))
                def _():
                    mask = _rows_mask(tile * bm, (bk, bm), lo, hi, dim=1)
                    l_smem[...] = (l_smem[...].astype(jnp.float32) * mask).astype(l_smem.dtype)
                    plgpu.commit_smem()
                plgpu.wgmma(acc_ref, l_smem, g_smem.T if k_major else g_smem)

            plgpu.emit_pipeline(
                step, grid=(n_tiles,),
                in_specs=[
                    plgpu.BlockSpec((bk, bm), lambda mm: (ki, tile0 + mm), transforms=lhs_tr,
                                    delay_release=1),
                    _operand_spec(k_major, bm, bn, lambda mm: (tile0 + mm, ni), grad.dtype)],
                max_concurrent_steps=bs.num_stages,
            )(lhs_ref, grad_ref)
            return acc_ref[...]

        acc = pl.run_scoped(matmul, plgpu.ACC((bk, bn)))
        store_tile(acc, out_ref.at[g, pl.ds(ki * bk, bk), pl.ds(ni * bn, bn)])

    kernel = plgpu.kernel(body, out_type=jax.ShapeDtypeStruct((g_count, k, n), lhs_t.dtype),
                          grid=(n // bn, k // bk, g_count), grid_names=("n", "k", "g"),
                          compiler_params=_params(), interpret=interpret)
    return kernel(starts, ends, lhs_t, grad)


# ----------------------------------------------------------------------------- wrapper + VJP
def _bounds(group_sizes, bm: int, m_padded: int):
    """-> (starts, ends) per group, for drhs; and, for the forward kernel, the non-empty groups
    in row order (ids, starts, ends) with, per M tile, the first/last of them in the tile."""
    # Clipped at the padded M: a traced sum above M must not send the drhs kernel's TMA past
    # the array (rows >= M are zero padding, so clipping there is ragged_dot's clipping at M).
    cum = jnp.cumsum(group_sizes.astype(jnp.int32))
    ends = jnp.minimum(cum, m_padded)
    starts = jnp.minimum(cum - group_sizes.astype(jnp.int32), m_padded)
    tile_lo = jnp.arange(m_padded // bm, dtype=jnp.int32) * bm
    # Empty groups are listed last (with bounds past every row), so no tile spends a K loop on
    # them; the non-empty ones keep their row order and strictly increasing bounds.
    empty = ends <= starts
    ids = jnp.argsort(empty, stable=True).astype(jnp.int32)
    past = jnp.iinfo(jnp.int32).max
    starts_ne = jnp.where(empty[ids], past, starts[ids])
    ends_ne = jnp.where(empty[ids], past, ends[ids])
    # first: the first group ending after the tile starts; last: the last one starting before
    # it ends. first > last: no group has rows there, and the tile is 0.
    first = jnp.searchsorted(ends_ne, tile_lo, side="right").astype(jnp.int32)
    last = (jnp.searchsorted(starts_ne, tile_lo + bm, side="left") - 1).astype(jnp.int32)
    return (starts, ends), (ids, starts_ne, ends_ne, first, last)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _grouped(lhs, rhs, group_sizes, bs, interpret):
    return _forward(lhs, rhs, group_sizes, bs, interpret)[0]


def _k_major(dtype) -> bool:
    """wgmma transposes only 16-bit SMEM operands; 32-bit ones must come contraction-fastest."""
    return jnp.dtype(dtype).itemsize == 4


def _forward(lhs, rhs, group_sizes, bs, interpret):
    (m, k), n = lhs.shape, rhs.shape[2]
    mp, kp, np_ = round_up(m, bs.block_m), round_up(k, bs.block_k), round_up(n, bs.block_n)
    groups, tiles = _bounds(group_sizes, bs.block_m, mp)
    lhs_p = pad_to(pad_to(lhs, 0, mp), 1, kp)
    rhs_p = pad_to(pad_to(rhs, 1, kp), 2, np_)
    k_major = _k_major(rhs.dtype)
    out = _gmm(lhs_p, jnp.swapaxes(rhs_p, 1, 2) if k_major else rhs_p, tiles, bs, interpret,
               k_major)
    return out[:m, :n], (lhs_p, rhs_p, group_sizes, groups, tiles, (m, k, n))


def _fwd(lhs, rhs, group_sizes, bs, interpret):
    return _forward(lhs, rhs, group_sizes, bs, interpret)


def _bwd(bs, interpret, res, grad):
    lhs_p, rhs_p, group_sizes, groups, tiles, (m, k, n) = res
    grad_p = pad_to(pad_to(grad.astype(lhs_p.dtype), 0, lhs_p.shape[0]), 1, rhs_p.shape[2])
    # dlhs = grad @ rhs[g]^T: the forward kernel contracting over N. rhs [G, K, N] is already
    # that operand stored contraction-fastest, so it needs no transpose for any dtype.
    bs_t = dataclasses.replace(bs, block_n=bs.block_k, block_k=bs.block_n)
    dlhs = _gmm(grad_p, rhs_p, tiles, bs_t, interpret, True)
    k_major = _k_major(lhs_p.dtype)
    drhs = _tgmm(lhs_p.T, grad_p.T if k_major else grad_p, *groups, bs, interpret, k_major)
    return (dlhs[:m, :k], drhs[:, :k, :n], jnp.zeros(group_sizes.shape, jax.dtypes.float0))


_grouped.defvjp(_fwd, _bwd)


def grouped_matmul(lhs_MxK, rhs_GxKxN, group_sizes_G, *, interpret=None, block_sizes=None):
    """`jax.lax.ragged_dot(lhs, rhs, group_sizes)` as Mosaic GPU kernels, differentiable.

    lhs [M, K] and rhs [G, K, N] of one float dtype; group_sizes [G] integers. A concrete
    group_sizes must sum to M (KernelInputError otherwise). A traced one is not checked: then a
    sum below M leaves the trailing rows 0 and a sum above M clips the groups at M, as
    ragged_dot does. `interpret=None`: GPU interpret mode unless the default backend is a GPU.
    """
    if jnp.ndim(lhs_MxK) != 2 or jnp.ndim(rhs_GxKxN) != 3 or jnp.ndim(group_sizes_G) != 1:
        raise KernelInputError(
            f"grouped_matmul wants lhs [M, K], rhs [G, K, N], group_sizes [G]; got ranks "
            f"{jnp.ndim(lhs_MxK)}, {jnp.ndim(rhs_GxKxN)}, {jnp.ndim(group_sizes_G)}")
    check_float("lhs", lhs_MxK)
    check_float("rhs", rhs_GxKxN)
    (m, k), (g, k2, _) = lhs_MxK.shape, rhs_GxKxN.shape
    if k != k2 or group_sizes_G.shape[0] != g:
        raise KernelInputError(f"grouped_matmul shapes disagree: lhs {lhs_MxK.shape}, rhs "
                               f"{rhs_GxKxN.shape}, group_sizes {group_sizes_G.shape}")
    if lhs_MxK.dtype != rhs_GxKxN.dtype:
        raise KernelInputError(f"lhs dtype {lhs_MxK.dtype} != rhs dtype {rhs_GxKxN.dtype}")
    if not jnp.issubdtype(group_sizes_G.dtype, jnp.integer):
        raise KernelInputError(f"group_sizes has dtype {group_sizes_G.dtype}; expected integers")
    if not isinstance(group_sizes_G, jax.core.Tracer):
        # numpy, not jnp: under an outer jit a jnp.sum of a constant would be traced.
        total = int(np.asarray(group_sizes_G).sum())
        if total != m:
            raise KernelInputError(f"group_sizes sum to {total}, not to the {m} rows of lhs")
    bs = block_sizes or default_block_sizes(lhs_MxK.dtype)
    bs.validate()
    mode = plgpu.InterpretGPUParams() if resolve_interpret(interpret) else None
    return _grouped(lhs_MxK, rhs_GxKxN, group_sizes_G.astype(jnp.int32), bs, mode)


# ----------------------------------------------------------------------------- reference
def grouped_matmul_reference(lhs_MxK, rhs_GxKxN, group_sizes_G):
    """`lax.ragged_dot` with float32 accumulation, cast to the input dtype (the CPU path)."""
    out = lax.ragged_dot(lhs_MxK, rhs_GxKxN, group_sizes_G.astype(jnp.int32),
                         preferred_element_type=jnp.float32)
    return out.astype(lhs_MxK.dtype)
