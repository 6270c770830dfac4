"""FlashAttention-2 forward and backward as Pallas kernels.

Tri Dao, "FlashAttention-2: Faster Attention with Better Parallelism and Work Partitioning"
(arXiv:2307.08691). Section numbers below refer to that paper.

Layout is jax.nn.dot_product_attention's: q [B, T, H, D], k and v [B, S, KVH, D] with
H % KVH == 0 (grouped-query / multi-query attention), output [B, T, H, D]. Masks follow that
function too: `causal` keeps key j <= query i (top-left aligned when T != S), `window=(l, r)`
keeps i - l <= j <= i + r (an int w means (w, w)); `segment_ids` keeps pairs in the same segment.
A query row with no key left gets output 0 and zero gradients.

`impl` picks the kernels: "mosaic" (Mosaic GPU, FA3-style, flash_attention_mgpu.py; the default
on Hopper or newer) or "triton" (this file: the Triton lowering, deprecated in jax 0.11, the
fallback and the default elsewhere). The Triton path is three pallas_calls: forward (also
writes the log-sum-exp; this file), dK/dV and dQ (flash_attention_backward.py); shared tiles and
masks live in _flash_blocks.py. The backward kernels recompute the attention probabilities
block by block from q, k and the saved log-sum-exp; no [T, S] matrix is ever written to memory.
Blocks that a causal / window mask removes entirely are skipped by the loop bounds, not
computed and masked.
"""
import dataclasses
import functools
import warnings

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import _common
from pallas_kernels._attention_args import band, check_inputs, segments, softmax_scale
from pallas_kernels._common import KernelInputError
from pallas_kernels._flash_blocks import (LOG2_E, MASK_VALUE, BlockSizes, _block_mask,
                                          _dot_nn, _dot_nt, _kv_head, _kv_steps, _segment_args,
                                          _segment_specs, _Spec, _split, _warps)
from pallas_kernels.flash_attention_backward import _backward_dkv, _backward_dq
from pallas_kernels.flash_attention_mgpu import (MosaicBlockSizes, default_block_sizes,
                                               mosaic_attention)

IMPLS = (None, "mosaic", "triton")
MOSAIC_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
MOSAIC_MAX_HEAD_DIM = 256


# ----------------------------------------------------------------------------- forward
def _forward_kernel(*refs, spec):
    """One query block against all its key blocks: Algorithm 1 of FlashAttention-2.

    Online softmax (Section 3.1.1): a running max m and running sum l per row; the
    accumulator is rescaled by exp(m_old - m_new) and divided by l only once at the end.
    Exponentials are base 2 with log2(e) folded into the scale (one multiply fewer per score).
    """
    (q_ref, k_ref, v_ref), sq_ref, sk_ref, (o_ref, lse_ref) = _split(refs, 3, spec.segments)
    bq, bk = spec.blocks.block_q, spec.blocks.block_k
    n_k = k_ref.shape[0] // bk
    q_start = pl.program_id(0) * bq
    q = q_ref[...]
    seg_q = None if sq_ref is None else sq_ref[...]
    scale = spec.sm_scale * LOG2_E

    def step(j, carry):
        acc, m, l = carry
        keys = pl.ds(j * bk, bk)
        k, v = k_ref[keys, :], v_ref[keys, :]
        s = _dot_nt(q, k) * scale
        seg_k = None if sk_ref is None else sk_ref[keys]
        mask = _block_mask(spec, q_start, j * bk, bq, bk, seg_q, seg_k)
        if mask is not None:
            s = jnp.where(mask, s, MASK_VALUE)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        p = jnp.exp2(s - m_new[:, None])
        if mask is not None:
            p = jnp.where(mask, p, 0.0)
        alpha = jnp.exp2(m - m_new)
        l = alpha * l + jnp.sum(p, axis=1)
        acc = alpha[:, None] * acc + _dot_nn(p.astype(v.dtype), v)
        return acc, m_new, l

    init = (jnp.zeros((bq, q.shape[1]), jnp.float32),
            jnp.full((bq,), MASK_VALUE, jnp.float32), jnp.zeros((bq,), jnp.float32))
    lo, hi = _kv_steps(spec, q_start, bq, bk, n_k)
    acc, m, l = lax.fori_loop(lo, hi, step, init)
    kept = l > 0.0
    l_safe = jnp.where(kept, l, 1.0)
    o_ref[...] = (acc / l_safe[:, None]).astype(o_ref.dtype)
    # log-sum-exp in base 2 (Section 3.1.1): all the backward needs to rebuild P.
    lse_ref[...] = jnp.where(kept, m + jnp.log2(l_safe), 0.0)


def _forward(spec, q, k, v, seg_q, seg_k):
    """Padded q [B, T, H, D], k/v [B, S, KVH, D] -> (o [B, T, H, D], lse [B, H, T] base 2)."""
    batch, seq_q, heads, dim = q.shape
    seq_k = k.shape[1]
    bq = spec.blocks.block_q
    row = pl.BlockSpec((None, bq, None, dim), lambda i, b, h: (b, i, h, 0))
    whole_kv = pl.BlockSpec((None, seq_k, None, dim), lambda i, b, h: (b, 0, _kv_head(h, spec), 0))
    in_specs = [row, whole_kv, whole_kv] + _segment_specs(
        spec, bq, seq_k, lambda i, b, h: (b, i), lambda i, b, h: (b, 0))
    return pl.pallas_call(
        functools.partial(_forward_kernel, spec=spec),
        grid=(seq_q // bq, batch, heads),
        in_specs=in_specs,
        out_specs=[row, pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i))],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((batch, heads, seq_q), jnp.float32)],
        compiler_params=_common.gpu_params(_warps(spec, dim), spec.blocks.num_stages),
        interpret=spec.interpret,
        name="flash_attention_fwd",
    )(q, k, v, *_segment_args(spec, seg_q, seg_k))


# ----------------------------------------------------------------------------- custom VJP
@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(spec, q, k, v, seg_q, seg_k):
    return _forward(spec, q, k, v, seg_q, seg_k)[0]


def _attention_fwd(spec, q, k, v, seg_q, seg_k):
    o, lse = _forward(spec, q, k, v, seg_q, seg_k)
    return o, (q, k, v, seg_q, seg_k, o, lse)


def _attention_bwd(spec, res, do):
    q, k, v, seg_q, seg_k, o, lse = res
    # D_i = rowsum(dO_i * O_i) (Algorithm 2, line 4): one elementwise pass, left to XLA.
    delta = jnp.einsum("bthd,bthd->bht", o.astype(jnp.float32), do.astype(jnp.float32))
    do = do.astype(q.dtype)
    dk, dv = _backward_dkv(spec, q, k, v, do, lse, delta, seg_q, seg_k)
    dq = _backward_dq(spec, q, k, v, do, lse, delta, seg_q, seg_k)
    if spec.groups > 1:
        batch, seq_k, kv_heads, dim = k.shape
        dk = dk.reshape(batch, seq_k, kv_heads, spec.groups, dim).sum(3).astype(k.dtype)
        dv = dv.reshape(batch, seq_k, kv_heads, spec.groups, dim).sum(3).astype(v.dtype)
    return dq, dk, dv, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


# ----------------------------------------------------------------------------- public wrapper
def _clamp_blocks(blocks, seq_q, seq_k):
    t = _common.tile
    return dataclasses.replace(
        blocks,
        block_q=t(blocks.block_q, seq_q), block_k=t(blocks.block_k, seq_k),
        block_q_dkv=t(blocks.block_q_dkv, seq_q), block_k_dkv=t(blocks.block_k_dkv, seq_k),
        block_q_dq=t(blocks.block_q_dq, seq_q), block_k_dq=t(blocks.block_k_dq, seq_k))


def _ptxas_miscompiles_masks():
    """jax's own Mosaic GPU attention reports a ptxas miscompilation of causal masking on CUDA
    runtimes 12.8.0 up to (not including) 12.9.1. cuda_versions is None without CUDA (CPU)."""
    from jax._src.lib import cuda_versions  # noqa: PLC0415  (jax internals; None on CPU)
    if cuda_versions is None:
        return False
    version = cuda_versions.cuda_runtime_get_version()
    return 12080 <= version < 12091


def _mosaic_unsupported(q, masked):
    """Why the Mosaic GPU kernels cannot take this call (-> Triton fallback), or None."""
    if q.dtype not in MOSAIC_DTYPES:
        return f"dtype {q.dtype} (wgmma attention kernels take bfloat16 / float16)"
    if q.shape[3] > MOSAIC_MAX_HEAD_DIM:
        return f"head_dim {q.shape[3]} > {MOSAIC_MAX_HEAD_DIM} (shared memory)"
    if masked and _ptxas_miscompiles_masks():
        return "masking on CUDA 12.8.0-12.9.0 (ptxas miscompiles it)"
    return None


def _mosaic(q, k, v, causal, sm_scale, window, segment_ids, interpret, block_sizes, warn):
    """The Mosaic GPU kernels' output, or None (after one warning when `warn`: the caller asked
    for mosaic by name) when they cannot take the call."""
    left, right = band(causal, window)
    left = None if left is not None and left >= q.shape[1] else left
    right = None if right is not None and right >= k.shape[1] else right
    seg_q, seg_k = segments(segment_ids, q.shape[0], q.shape[1], k.shape[1])
    why = _mosaic_unsupported(q, left is not None or right is not None)
    if why is not None:
        if not warn:
            return None
        warnings.warn(f"flash_attention: impl='mosaic' does not support {why}; running the "
                      f"Triton path", stacklevel=3)
        return None
    if block_sizes is not None and not isinstance(block_sizes, MosaicBlockSizes):
        raise KernelInputError(f"impl='mosaic' takes block_sizes=MosaicBlockSizes(...); got "
                               f"{type(block_sizes).__name__}")
    dim = q.shape[3]
    pad_d = _common.round_up(dim, 64)     # zero columns change no score; sliced off below

    def pad(x):
        return _common.pad_to(x, 3, pad_d)
    out = mosaic_attention(pad(q), pad(k), pad(v), seg_q, seg_k, left=left, right=right,
                           sm_scale=softmax_scale(sm_scale, dim),
                           blocks=block_sizes or default_block_sizes(pad_d),
                           interpret=_common.resolve_interpret(interpret))
    return out[..., :dim]


def flash_attention(q, k, v, *, causal=False, sm_scale=None, window=None, segment_ids=None,
                    impl=None, interpret=None, block_sizes=None):
    """Fused multi-head attention, differentiable, in jax.nn.dot_product_attention's layout.

    q [B, T, H, D]; k, v [B, S, KVH, D] with H % KVH == 0; float32, bfloat16 or float16.
    sm_scale defaults to 1/sqrt(D). window: int w or (left, right) (see module docstring).
    segment_ids: int [B, T] when T == S, or a pair ([B, T], [B, S]).
    impl: "mosaic", "triton" or None (mosaic on a Hopper-or-newer GPU unless block_sizes is a
    triton BlockSizes, else triton). A call the Mosaic GPU kernels cannot take (float32,
    head_dim > 256, masks on CUDA 12.8.0-12.9.0) runs on the Triton path, with one warning
    when impl="mosaic" was asked for by name.
    interpret: None -> interpret mode off GPU (Mosaic GPU's or Pallas' interpreter), compiled
    on GPU.
    block_sizes: a MosaicBlockSizes (mosaic) or BlockSizes (triton) to override the tiles
    (tuning, tests); None for the defaults.
    Any T, S and D: the wrapper pads to whole blocks (D to a multiple of 64 for mosaic, a power
    of two for triton) and masks.
    """
    if impl not in IMPLS:
        raise KernelInputError(f"impl must be None, 'mosaic' or 'triton'; got {impl!r}")
    check_inputs(q, k, v)
    chosen = impl is not None
    if impl is None:   # triton BlockSizes keep a tuned caller on the path they were tuned for
        impl = "triton" if isinstance(block_sizes, BlockSizes) else _common.default_impl()
    if impl == "mosaic":
        # The default choice moves a case mosaic cannot take (float32 models on a Hopper)
        # to Triton silently; only an explicit impl="mosaic" warns that it did.
        out = _mosaic(q, k, v, causal, sm_scale, window, segment_ids, interpret, block_sizes,
                      warn=chosen)
        if out is not None:
            return out
        if isinstance(block_sizes, MosaicBlockSizes):     # fell back: Triton's own defaults
            block_sizes = None
    elif isinstance(block_sizes, MosaicBlockSizes):
        raise KernelInputError("impl='triton' takes block_sizes=BlockSizes(...); got "
                               "MosaicBlockSizes")
    return _triton_attention(q, k, v, causal=causal, sm_scale=sm_scale, window=window,
                             segment_ids=segment_ids, interpret=interpret,
                             block_sizes=block_sizes)


def _triton_attention(q, k, v, *, causal, sm_scale, window, segment_ids, interpret,
                      block_sizes):
    batch, seq_q, heads, dim = q.shape
    seq_k = k.shape[1]
    left, right = band(causal, window)
    # A limit no pair can exceed masks nothing: drop it (saves work, keeps int32 bounds small).
    left = None if left is not None and left >= seq_q else left
    right = None if right is not None and right >= seq_k else right
    seg_q, seg_k = segments(segment_ids, batch, seq_q, seq_k)
    blocks = _clamp_blocks(block_sizes or BlockSizes(), seq_q, seq_k)
    pad_q = _common.round_up(seq_q, max(blocks.block_q, blocks.block_q_dkv, blocks.block_q_dq))
    pad_k = _common.round_up(seq_k, max(blocks.block_k, blocks.block_k_dkv, blocks.block_k_dq))
    pad_d = max(_common.MIN_TILE, _common.next_pow2(dim))
    spec = _Spec(sm_scale=softmax_scale(sm_scale, dim),
                 left=left, right=right, seq_k=seq_k, pad_k=pad_k != seq_k,
                 groups=heads // k.shape[2], blocks=blocks, segments=seg_q is not None,
                 interpret=_common.resolve_interpret(interpret))

    def pad(x, length):
        return _common.pad_to(_common.pad_to(x, 1, length), 3, pad_d)

    if spec.segments:
        seg_q, seg_k = _common.pad_to(seg_q, 1, pad_q), _common.pad_to(seg_k, 1, pad_k)
    out = _attention(spec, pad(q, pad_q), pad(k, pad_k), pad(v, pad_k), seg_q, seg_k)
    return out[:, :seq_q, :, :dim]


# ----------------------------------------------------------------------------- reference
def flash_attention_reference(q, k, v, *, causal=False, sm_scale=None, window=None,
                              segment_ids=None):
    """Plain-jnp attention with the same arguments and masks: the oracle for the kernel.

    Materializes the [B, H, T, S] scores; computes in float32, returns q's dtype.
    """
    check_inputs(q, k, v)
    batch, seq_q, heads, dim = q.shape
    seq_k, kv_heads = k.shape[1], k.shape[2]
    left, right = band(causal, window)
    seg_q, seg_k = segments(segment_ids, batch, seq_q, seq_k)
    scale = softmax_scale(sm_scale, dim)
    k = jnp.repeat(k.astype(jnp.float32), heads // kv_heads, axis=2)
    v = jnp.repeat(v.astype(jnp.float32), heads // kv_heads, axis=2)
    s_BxHxTxS = jnp.einsum("bthd,bshd->bhts", q.astype(jnp.float32), k) * scale
    i = jnp.arange(seq_q)[:, None]
    j = jnp.arange(seq_k)[None, :]
    keep = jnp.ones((1, 1, seq_q, seq_k), bool)
    if right is not None:
        keep &= j - i <= right
    if left is not None:
        keep &= i - j <= left
    if seg_q is not None:
        keep = keep & (seg_q[:, None, :, None] == seg_k[:, None, None, :])
    p = jax.nn.softmax(jnp.where(keep, s_BxHxTxS, MASK_VALUE), axis=-1)
    p = jnp.where(keep, p, 0.0)        # rows with no kept key give 0, as in the kernel
    return jnp.einsum("bhts,bshd->bthd", p, v).astype(q.dtype)
