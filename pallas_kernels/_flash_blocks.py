"""Tiles, masks and loop bounds shared by the FlashAttention-2 forward and backward kernels."""
import dataclasses
import math

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

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


# ----------------------------------------------------------------------------- in-kernel helpers
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


def _block_range(start, size, before, after, block, n_blocks):
    """Blocks [lo, hi) of length `block` that meet [start - before, start + size + after)
    (None: unbounded on that side)."""
    lo, hi = 0, n_blocks
    if before is not None:
        lo = lax.div(jnp.maximum(start - before, 0), jnp.int32(block))
    if after is not None:
        hi = jnp.minimum(lax.div(start + (size + after + block - 1), jnp.int32(block)), n_blocks)
    return lo, hi


def _kv_steps(spec, q_start, bq, bk, n_blocks):
    """Key blocks [lo, hi) that can hold a kept key for query rows [q_start, q_start + bq)."""
    return _block_range(q_start, bq, spec.left, spec.right, bk, n_blocks)


def _q_steps(spec, k_start, bq, bk, n_blocks):
    """Query blocks [lo, hi) that can keep a key in [k_start, k_start + bk)."""
    return _block_range(k_start, bk, spec.right, spec.left, bq, n_blocks)


def _split(refs, n_in, segments):
    """Kernel refs -> (inputs, seg_q_ref, seg_k_ref, outputs); segment refs come last in."""
    if segments:
        return refs[:n_in], refs[n_in], refs[n_in + 1], refs[n_in + 2:]
    return refs[:n_in], None, None, refs[n_in:]


# ----------------------------------------------------------------------------- pallas_call helpers
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
