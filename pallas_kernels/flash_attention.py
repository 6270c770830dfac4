"""FlashAttention-2 forward and backward as Pallas kernels.

Tri Dao, "FlashAttention-2: Faster Attention with Better Parallelism and Work Partitioning"
(arXiv:2307.08691). Section numbers below refer to that paper.

Layout is jax.nn.dot_product_attention's: q [B, T, H, D], k and v [B, S, KVH, D] with
H % KVH == 0 (grouped-query / multi-query attention), output [B, T, H, D]. Masks follow that
function too: `causal` keeps key j <= query i (top-left aligned when T != S), `window=(l, r)`
keeps i - l <= j <= i + r (an int w means (w, w)); `segment_ids` keeps pairs in the same segment.
A query row with no key left gets output 0 and zero gradients.

Three pallas_calls: forward (also writes the log-sum-exp), dK/dV and dQ. The backward kernels
recompute the attention probabilities block by block from q, k and the saved log-sum-exp; no
[T, S] matrix is ever written to memory. Blocks that a causal / window mask removes entirely
are skipped by the loop bounds, not computed and masked.
"""
import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import _common
from pallas_kernels._attention_args import band, check_inputs, segments, softmax_scale

LOG2_E = math.log2(math.e)
# Finite stand-in for -inf: a fully masked block then gives exp2(MASK - MASK) = 1 (removed
# again by the mask) instead of exp2(-inf + inf) = nan.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


# ----------------------------------------------------------------------------- block sizes
@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes (powers of two >= 16; clamped down for short sequences).

    Defaults are a conservative first guess for H100/H200, not tuned on hardware yet.
    """
    block_q: int = 128          # forward: query rows per program (the grid's parallel axis)
    block_k: int = 64           # forward: keys per inner-loop step
    block_q_dkv: int = 64       # dK/dV kernel: query rows per inner-loop step
    block_k_dkv: int = 64       # dK/dV kernel: keys per program
    block_q_dq: int = 64        # dQ kernel: query rows per program
    block_k_dq: int = 64        # dQ kernel: keys per inner-loop step
    num_warps: int = 0          # 0: 4 for head_dim <= 64, else 8
    num_stages: int = 2         # Triton software-pipelining depth of the inner loops


@dataclasses.dataclass(frozen=True)
class _Spec:
    """Everything static about one call; hashable, so it rides along as a nondiff argument."""
    sm_scale: float
    left: int | None            # keep i - j <= left   (None: unbounded)
    right: int | None           # keep j - i <= right  (causal: 0)
    seq_k: int                  # true key length; padded keys (>= seq_k) are masked
    pad_k: bool                 # whether the wrapper padded keys at all
    groups: int                 # query heads per kv head
    blocks: BlockSizes          # clamped to the problem
    segments: bool
    interpret: bool


# ----------------------------------------------------------------------------- kernels
def _dot_nt(a, b):
    """a [m, d] @ b[n, d]^T -> [m, n] in float32."""
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _dot_tn(a, b):
    """a [m, n]^T @ b[m, d] -> [n, d] in float32."""
    return lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _dot_nn(a, b):
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _and(a, b):
    return b if a is None else jnp.logical_and(a, b)


def _block_mask(spec, q_start, k_start, bq, bk, seg_q, seg_k):
    """Boolean [bq, bk] of kept (query, key) pairs, or None when nothing is masked."""
    rows = q_start + jnp.arange(bq, dtype=jnp.int32)[:, None]
    cols = k_start + jnp.arange(bk, dtype=jnp.int32)[None, :]
    mask = None
    if spec.right is not None:
        mask = _and(mask, cols - rows <= spec.right)
    if spec.left is not None:
        mask = _and(mask, rows - cols <= spec.left)
    if spec.pad_k:
        mask = _and(mask, cols < spec.seq_k)
    if seg_q is not None:
        mask = _and(mask, seg_q[:, None] == seg_k[None, :])
    return mask


def _kv_steps(spec, q_start, bq, bk, n_blocks):
    """Key blocks [lo, hi) that can hold a kept key for query rows [q_start, q_start + bq)."""
    lo, hi = 0, n_blocks
    if spec.left is not None:
        lo = lax.div(jnp.maximum(q_start - spec.left, 0), jnp.int32(bk))
    if spec.right is not None:
        hi = jnp.minimum(lax.div(q_start + (bq + spec.right + bk - 1), jnp.int32(bk)), n_blocks)
    return lo, hi


def _q_steps(spec, k_start, bq, bk, n_blocks):
    """Query blocks [lo, hi) that can keep a key in [k_start, k_start + bk)."""
    lo, hi = 0, n_blocks
    if spec.right is not None:
        lo = lax.div(jnp.maximum(k_start - spec.right, 0), jnp.int32(bq))
    if spec.left is not None:
        hi = jnp.minimum(lax.div(k_start + (bk + spec.left + bq - 1), jnp.int32(bq)), n_blocks)
    return lo, hi


def _split(refs, n_in, segments):
    """Kernel refs -> (inputs, seg_q_ref, seg_k_ref, outputs); segment refs come last in."""
    if segments:
        return refs[:n_in], refs[n_in], refs[n_in + 1], refs[n_in + 2:]
    return refs[:n_in], None, None, refs[n_in:]


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


# ----------------------------------------------------------------------------- pallas_calls
def _kv_head(h, spec):
    """Query head h reads kv head h // groups (GQA); an index map, so integer ops only."""
    return h if spec.groups == 1 else lax.div(h, jnp.int32(spec.groups))


def _warps(spec, head_dim):
    return spec.blocks.num_warps or (4 if head_dim <= 64 else 8)


def _segment_specs(spec, q_block, k_block, q_index, k_index):
    if not spec.segments:
        return []
    return [pl.BlockSpec((None, q_block), q_index), pl.BlockSpec((None, k_block), k_index)]


def _segment_args(spec, seg_q, seg_k):
    return [seg_q, seg_k] if spec.segments else []


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


def flash_attention(q, k, v, *, causal=False, sm_scale=None, window=None, segment_ids=None,
                    interpret=None, block_sizes=None):
    """Fused multi-head attention, differentiable, in jax.nn.dot_product_attention's layout.

    q [B, T, H, D]; k, v [B, S, KVH, D] with H % KVH == 0; float32, bfloat16 or float16.
    sm_scale defaults to 1/sqrt(D). window: int w or (left, right) (see module docstring).
    segment_ids: int [B, T] when T == S, or a pair ([B, T], [B, S]).
    interpret: None -> interpret mode off GPU, compiled (Triton lowering) on GPU.
    block_sizes: a BlockSizes to override the tiles (tuning, tests); None for the defaults.
    Any T, S and D: the wrapper pads to whole blocks (D to a power of two) and masks.
    """
    check_inputs(q, k, v)
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
