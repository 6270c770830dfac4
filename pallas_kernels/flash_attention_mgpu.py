"""FlashAttention forward on Mosaic GPU (`plgpu.kernel`), FA3-style warp specialisation.

Jay Shah, Ganesh Bikshandi, Ying Zhang, Vijay Thakkar, Pradeep Ramani, Tri Dao,
"FlashAttention-3: Fast and Accurate Attention with Asynchrony and Low-precision"
(arXiv:2407.08608), and FlashAttention-2 (arXiv:2307.08691) for the algorithm itself.

One CTA = 3 warpgroups and 2 * block_q query rows of one (batch, head):
* warpgroup 2, the producer (FA3 Section 3.1, "producer-consumer asynchrony"): gives its
  registers away (`set_max_registers`) and only issues TMA copies of K and V tiles into a ring of
  `num_stages` swizzled SMEM slots; before refilling a slot it waits on that slot's "free" barrier.
* warpgroups 0 and 1, the consumers: each TMA-loads its own block_q query rows once, then per
  key block waits on the slot's "full" barrier, computes S = Q K^T with wgmma, does the online
  softmax in registers (FA2 Section 3.1.1, base-2 exponentials with log2(e) folded into the
  scale), P V with wgmma (P through a swizzled SMEM tile: see `matmul`), and arrives on the
  slot's free barrier (2 arrivals: both consumers read every slot).
The consumers write O and the base-2 row log-sum-exp (what the backward needs to rebuild P).

Block skipping is per CTA: the producer streams the key blocks that any of the CTA's
2 * block_q rows can see (causal / window bounds); both consumers walk the same range and mask.

Masks (causal, window, padded keys, segment ids) are iota / id comparisons in the wgmma register
layout. PITFALL: jax's own Mosaic GPU attention reports that causal masking miscompiles with
ptxas on CUDA 12.8.0 up to (not including) 12.9.1; the wrapper (flash_attention.py) routes
causal / window calls to the Triton path on those runtimes.
The backward (dK/dV and dQ kernels) is in flash_attention_mgpu_backward.py.
"""
from __future__ import annotations

import dataclasses
import math
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels._common import KernelInputError, pad_to, round_up
from pallas_kernels._flash_blocks import LOG2_E, MASK_VALUE, _block_range
from pallas_kernels._mgpu import transforms

HW_TILE = 64             # wgmma's warpgroup tile: 64 rows; 64 16-bit columns = a 128 B swizzle
CONSUMERS = 2            # consumer warpgroups per forward CTA (FA3 Section 3.1)
# H100/H200 shared memory per block (Mosaic GPU's own limit at lowering: 232448 B), less 4 KiB
# for the barriers and alignment padding that forward_smem_bytes does not count.
SMEM_BYTES = 227 * 1024 - 4096


# ----------------------------------------------------------------------------- block sizes
@dataclasses.dataclass(frozen=True)
class MosaicBlockSizes:
    """Tiles of the three Mosaic GPU kernels (first guess for H100/H200, not tuned on hardware)."""
    block_q: int = 64         # forward: query rows per consumer warpgroup (CTA: 2 * block_q)
    block_kv: int = 128       # forward: keys per pipeline step
    num_stages: int = 2       # forward: K/V SMEM slots in the ring
    block_q_dkv: int = 64     # dK/dV: query rows per pipeline step
    block_kv_dkv: int = 64    # dK/dV: keys per CTA
    block_q_dq: int = 64      # dQ: query rows per CTA
    block_kv_dq: int = 64     # dQ: keys per pipeline step
    bwd_stages: int = 2       # backward pipelines' depth

    def validate(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if "stages" in f.name:
                if not isinstance(value, int) or value < 2:
                    raise KernelInputError(f"block_sizes.{f.name}={value} must be >= 2 (a slot is "
                                           f"refilled while the other is read)")
            elif not isinstance(value, int) or value <= 0 or value % HW_TILE:
                raise KernelInputError(f"block_sizes.{f.name}={value} must be a positive "
                                       f"multiple of {HW_TILE} (the wgmma tile)")


def default_block_sizes(head_dim: int) -> MosaicBlockSizes:
    """head_dim 256 halves the key block so Q (2 x 64 x 256) + K/V (2 stages) fit in SMEM."""
    return MosaicBlockSizes(block_kv=64) if head_dim > 128 else MosaicBlockSizes()


def forward_smem_bytes(bs: MosaicBlockSizes, head_dim: int, itemsize: int = 2) -> int:
    q = CONSUMERS * bs.block_q * head_dim * itemsize
    kv = 2 * bs.num_stages * bs.block_kv * head_dim * itemsize
    p = CONSUMERS * bs.block_q * bs.block_kv * itemsize
    return q + kv + p + CONSUMERS * bs.block_q * 4


@dataclasses.dataclass(frozen=True)
class MosaicSpec:
    """Everything static about one call (hashable: a nondiff argument of the custom VJP)."""
    sm_scale: float
    left: int | None          # keep i - j <= left   (None: unbounded)
    right: int | None         # keep j - i <= right  (causal: 0)
    seq_k: int                # true key length; keys >= seq_k are padding and masked
    pad_k: bool
    groups: int               # query heads per kv head (GQA / MQA)
    segments: bool            # segment ids given: keep pairs of equal id
    blocks: MosaicBlockSizes
    interpret: object         # plgpu.InterpretGPUParams() or None (compiled)

    @property
    def masked(self) -> bool:
        return (self.left is not None or self.right is not None or self.pad_k
                or self.segments)


# ----------------------------------------------------------------------------- in-kernel helpers
def keep_mask(spec, row0, col0, shape, transposed=False, seg_rows=None, seg_cols=None):
    """Boolean `shape` of kept (query, key) pairs in the wgmma layout; None if nothing is masked.

    Rows are queries starting at row0 and columns keys starting at col0; transposed: rows are
    keys (col0 is then the first query), as in the dK/dV kernel's S^T. seg_rows / seg_cols: the
    segment ids of the rows / columns (layouts WGMMA.reduce(1) / reduce(0))."""
    if not spec.masked:
        return None
    a = row0 + plgpu.broadcasted_iota(jnp.int32, shape, 0, layout=plgpu.Layout.WGMMA)
    b = col0 + plgpu.broadcasted_iota(jnp.int32, shape, 1, layout=plgpu.Layout.WGMMA)
    q_ids, k_ids = (b, a) if transposed else (a, b)
    keep = None

    def both(x, y):
        return y if x is None else x & y
    if spec.right is not None:
        keep = both(keep, k_ids - q_ids <= spec.right)
    if spec.left is not None:
        keep = both(keep, q_ids - k_ids <= spec.left)
    if spec.pad_k:
        keep = both(keep, k_ids < spec.seq_k)
    if seg_rows is not None:
        keep = both(keep, rows(seg_rows, shape, 0) == rows(seg_cols, shape, 1))
    return keep


def matmul(a, b, shape):
    """a @ b with wgmma into a fresh float32 accumulator; reading it waits for the wgmma.

    Accumulating in place (`pl.run_state(...)(plgpu.ACC.init(acc))`) would save one register
    add per step, and FA3 feeds P to wgmma from registers; the Mosaic GPU interpreter of
    jax 0.11.2 runs neither (no run_state, SMEM-only wgmma operands), so P and dS go through a
    swizzled SMEM tile and every product gets a fresh accumulator."""
    def body(acc_ref):
        plgpu.wgmma(acc_ref, a, b)
        return acc_ref[...]
    return pl.run_scoped(body, plgpu.ACC(shape, jnp.float32))


def rows(x, shape, dim):
    """Broadcast a per-row (dim 0) or per-column (dim 1) vector to `shape`."""
    return lax.broadcast_in_dim(x, shape, [dim])


def unmasked_blocks(spec, q_min, q_max, block, lo, hi):
    """Key blocks [a, b) inside [lo, hi) where no causal / window / padding mask removes a pair
    for query rows q_min..q_max: those steps skip the mask (segment ids always need it)."""
    if not spec.masked:
        return lo, hi
    if spec.segments:
        return lo, lo
    a, b = lo, hi
    if spec.left is not None:       # every row r <= q_max keeps key k >= a * block
        a = jnp.maximum(a, lax.div(q_max - spec.left + block - 1, jnp.int32(block)))
    if spec.right is not None:      # every row r >= q_min keeps key k < b * block
        b = jnp.minimum(b, lax.div(q_min + spec.right + 1, jnp.int32(block)))
    if spec.pad_k:
        b = jnp.minimum(b, spec.seq_k // block)
    a = jnp.minimum(a, hi)
    return a, jnp.clip(b, a, hi)


# ----------------------------------------------------------------------------- forward kernel
def _forward_kernel(*refs, spec, dim):
    if spec.segments:
        q_ref, k_ref, v_ref, sq_ref, sk_ref, o_ref, lse_ref, smem, barriers = refs
    else:
        (q_ref, k_ref, v_ref, o_ref, lse_ref, smem, barriers), sq_ref, sk_ref = refs, None, None
    bq, bkv, stages = spec.blocks.block_q, spec.blocks.block_kv, spec.blocks.num_stages
    q_smem2, k_smem, v_smem, lse_smem2, p_smem2, sq_smem2, sk_smem = smem
    q_full, k_full, v_full, k_free, v_free, sq_full, sk_full = barriers
    b, h, wg = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("wg")
    cta_q = lax.axis_index("q") * (CONSUMERS * bq)
    # Key blocks any of the CTA's rows can see: the causal / window skip of FA2 Section 3.1.
    lo, hi = _block_range(cta_q, CONSUMERS * bq, spec.left, spec.right, bkv,
                          k_ref.shape[1] // bkv)
    scale = spec.sm_scale * LOG2_E

    def slot_of(j):
        return lax.rem(j - lo, stages)

    @pl.when(wg < CONSUMERS)
    def _consumer():
        plgpu.set_max_registers(232, action="increase")
        q_smem, lse_smem, p_smem = q_smem2.at[wg], lse_smem2.at[wg], p_smem2.at[wg]
        q0 = cta_q + wg * bq
        plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(q0, bq), h], q_smem, q_full.at[wg])
        plgpu.barrier_wait(q_full.at[wg])
        seg_q = None
        if spec.segments:
            plgpu.copy_gmem_to_smem(sq_ref.at[b, pl.ds(q0, bq)], sq_smem2.at[wg], sq_full.at[wg])
            plgpu.barrier_wait(sq_full.at[wg])
            seg_q = plgpu.load(sq_smem2.at[wg], layout=plgpu.Layout.WGMMA.reduce(1))

        def step(j, carry, masked):
            acc, m, l = carry
            slot = slot_of(j)
            plgpu.barrier_wait(k_full.at[slot])

            s = matmul(q_smem, k_smem.at[slot].T, (bq, bkv)) * scale
            seg_k = None
            if spec.segments:      # the key ids ride in the K slot (released with it)
                plgpu.barrier_wait(sk_full.at[slot])
                seg_k = plgpu.load(sk_smem.at[slot], layout=plgpu.Layout.WGMMA.reduce(0))
            plgpu.barrier_arrive(k_free.at[slot])
            keep = (keep_mask(spec, q0, j * bkv, (bq, bkv), seg_rows=seg_q, seg_cols=seg_k)
                    if masked else None)
            if keep is not None:
                s = jnp.where(keep, s, MASK_VALUE)
            # Online softmax (FA2 Section 3.1.1): rescale by exp2(m_old - m_new), divide by l
            # once at the end.
            m_new = jnp.maximum(m, s.max(axis=1))
            p = jnp.exp2(s - rows(m_new, s.shape, 0))
            if keep is not None:   # a row with no key yet has m = MASK_VALUE and p = 1
                p = jnp.where(keep, p, 0.0)
            alpha = jnp.exp2(m - m_new)
            l = l * alpha + p.sum(axis=1)
            plgpu.barrier_wait(v_full.at[slot])
            p_smem[...] = p.astype(p_smem.dtype)
            plgpu.commit_smem()            # the generic-proxy store, before wgmma reads it
            pv = matmul(p_smem, v_smem.at[slot], acc.shape)
            acc = acc * rows(alpha, acc.shape, 0) + pv
            plgpu.barrier_arrive(v_free.at[slot])
            return acc, m_new, l

        vec = plgpu.Layout.WGMMA.reduce(1)
        init = (plgpu.layout_cast(jnp.zeros((bq, dim), jnp.float32), plgpu.Layout.WGMMA),
                plgpu.layout_cast(jnp.full((bq,), MASK_VALUE, jnp.float32), vec),
                plgpu.layout_cast(jnp.zeros((bq,), jnp.float32), vec))
        # Blocks away from the band's edges and the padding need no mask; the consumer still
        # walks the CTA's whole range [lo, hi) in order, as the producer fills the ring.
        a, b_ = unmasked_blocks(spec, q0, q0 + bq - 1, bkv, lo, hi)
        carry = lax.fori_loop(lo, a, functools.partial(step, masked=True), init)
        carry = lax.fori_loop(a, b_, functools.partial(step, masked=False), carry)
        acc, m, l = lax.fori_loop(b_, hi, functools.partial(step, masked=True), carry)
        kept = l > 0.0                     # rows with no key at all give 0 (and lse 0)
        l_safe = jnp.where(kept, l, 1.0)
        q_smem[...] = (acc / rows(l_safe, acc.shape, 0)).astype(q_smem.dtype)
        lse_smem[...] = jnp.where(kept, m + jnp.log2(l_safe), 0.0)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(q_smem, o_ref.at[b, pl.ds(q0, bq), h])
        plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[b, h, pl.ds(q0, bq)])
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == CONSUMERS)
    def _producer():
        plgpu.set_max_registers(40, action="decrease")
        kv_h = h if spec.groups == 1 else lax.div(h, jnp.int32(spec.groups))   # GQA: no repeat

        def load(j, slot):
            keys = (b, pl.ds(j * bkv, bkv), kv_h)
            plgpu.copy_gmem_to_smem(k_ref.at[keys], k_smem.at[slot], k_full.at[slot])
            plgpu.copy_gmem_to_smem(v_ref.at[keys], v_smem.at[slot], v_full.at[slot])
            if spec.segments:
                plgpu.copy_gmem_to_smem(sk_ref.at[b, pl.ds(j * bkv, bkv)], sk_smem.at[slot],
                                        sk_full.at[slot])

        for i in range(min(stages, k_ref.shape[1] // bkv)):     # fill the ring
            pl.when(lo + i < hi)(functools.partial(load, lo + i, i))

        @pl.loop(lo + stages, hi)
        def _refill(j):
            slot = slot_of(j)
            plgpu.barrier_wait(k_free.at[slot])
            plgpu.barrier_wait(v_free.at[slot])
            load(j, slot)

        # Drain: see the consumers release the last slots, so every barrier phase is observed
        # before the SMEM ring goes away (the interpreter checks this).
        @pl.loop(jnp.maximum(hi - stages, lo), hi)
        def _drain(j):
            plgpu.barrier_wait(k_free.at[slot_of(j)])
            plgpu.barrier_wait(v_free.at[slot_of(j)])


def _forward(spec, q, k, v, seg_q, seg_k):
    """Padded q [B, Tp, H, D], k/v [B, Sp, KVH, D] -> (o [B, Tp, H, D], lse [B, H, Tp] base 2)."""
    batch, seq_q, heads, dim = q.shape
    bq, bkv, stages = spec.blocks.block_q, spec.blocks.block_kv, spec.blocks.num_stages
    tr = transforms(dim, q.dtype)
    smem = (plgpu.SMEM((CONSUMERS, bq, dim), q.dtype, transforms=tr),
            plgpu.SMEM((stages, bkv, dim), q.dtype, transforms=tr),
            plgpu.SMEM((stages, bkv, dim), q.dtype, transforms=tr),
            plgpu.SMEM((CONSUMERS, bq), jnp.float32),
            plgpu.SMEM((CONSUMERS, bq, bkv), q.dtype, transforms=transforms(bkv, q.dtype)),
            plgpu.SMEM((CONSUMERS, bq), jnp.int32) if spec.segments else None,
            plgpu.SMEM((stages, bkv), jnp.int32) if spec.segments else None)
    barriers = (plgpu.Barrier(num_barriers=CONSUMERS),
                plgpu.Barrier(num_barriers=stages), plgpu.Barrier(num_barriers=stages),
                plgpu.Barrier(num_arrivals=CONSUMERS, num_barriers=stages),
                plgpu.Barrier(num_arrivals=CONSUMERS, num_barriers=stages),
                plgpu.Barrier(num_barriers=CONSUMERS) if spec.segments else None,
                plgpu.Barrier(num_barriers=stages) if spec.segments else None)
    kernel = plgpu.kernel(
        functools.partial(_forward_kernel, spec=spec, dim=dim),
        out_type=(jax.ShapeDtypeStruct(q.shape, q.dtype),
                  jax.ShapeDtypeStruct((batch, heads, seq_q), jnp.float32)),
        grid=(seq_q // (CONSUMERS * bq), heads, batch), grid_names=("q", "heads", "batch"),
        num_threads=CONSUMERS + 1, thread_name="wg",
        scratch_types=(smem, barriers),
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=spec.interpret)
    return kernel(q, k, v, *((seg_q, seg_k) if spec.segments else ()))


# ----------------------------------------------------------------------------- custom VJP
@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(spec, q, k, v, seg_q, seg_k):
    return _forward(spec, q, k, v, seg_q, seg_k)[0]


def _attention_fwd(spec, q, k, v, seg_q, seg_k):
    o, lse = _forward(spec, q, k, v, seg_q, seg_k)
    return o, (q, k, v, o, lse, seg_q, seg_k)


def _attention_bwd(spec, res, do):
    # Imported here: the backward module imports this one's helpers.
    from pallas_kernels.flash_attention_mgpu_backward import backward  # noqa: PLC0415
    return backward(spec, *res, do.astype(res[0].dtype)) + (None, None)


_attention.defvjp(_attention_fwd, _attention_bwd)


def mosaic_attention(q, k, v, seg_q, seg_k, *, left, right, sm_scale, blocks, interpret):
    """Checked inputs (flash_attention.py) -> padded kernels -> output [B, T, H, D]."""
    blocks.validate()
    dim = q.shape[3]
    if forward_smem_bytes(blocks, dim) > SMEM_BYTES:
        raise KernelInputError(f"block_sizes {blocks} need {forward_smem_bytes(blocks, dim)} B of "
                               f"shared memory for head_dim {dim}; at most {SMEM_BYTES}")
    seq_q, seq_k = q.shape[1], k.shape[1]
    b = blocks
    pad_q = round_up(seq_q, math.lcm(CONSUMERS * b.block_q, b.block_q_dkv, b.block_q_dq))
    pad_k = round_up(seq_k, math.lcm(b.block_kv, b.block_kv_dkv, b.block_kv_dq))
    spec = MosaicSpec(sm_scale=sm_scale, left=left, right=right, seq_k=seq_k,
                      pad_k=pad_k != seq_k, groups=q.shape[2] // k.shape[2],
                      segments=seg_q is not None, blocks=blocks,
                      interpret=plgpu.InterpretGPUParams() if interpret else None)
    if spec.segments:
        seg_q, seg_k = pad_to(seg_q, 1, pad_q), pad_to(seg_k, 1, pad_k)
    out = _attention(spec, pad_to(q, 1, pad_q), pad_to(k, 1, pad_k), pad_to(v, 1, pad_k),
                     seg_q, seg_k)
    return out[:, :seq_q]
