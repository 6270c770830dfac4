"""Argument checks for flash_attention and its reference: errors name the argument."""
import math

import jax.numpy as jnp

from pallas_kernels import _common
from pallas_kernels._common import KernelInputError


def check_inputs(q, k, v):
    for name, x in (("q", q), ("k", k), ("v", v)):
        if getattr(x, "ndim", None) != 4:
            raise KernelInputError(f"{name} must be [batch, seq, heads, head_dim]; got shape "
                                   f"{getattr(x, 'shape', type(x).__name__)}")
        _common.check_float(name, x)
    if not q.dtype == k.dtype == v.dtype:
        raise KernelInputError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape != v.shape:
        raise KernelInputError(f"k and v must have the same shape; got {k.shape} and {v.shape}")
    if q.shape[0] != k.shape[0]:
        raise KernelInputError(f"q and k disagree on batch: {q.shape[0]} vs {k.shape[0]}")
    if q.shape[3] != k.shape[3]:
        raise KernelInputError(f"q and k disagree on head_dim: {q.shape[3]} vs {k.shape[3]}")
    if min(q.shape) == 0 or min(k.shape) == 0:
        raise KernelInputError(f"empty input: q {q.shape}, k {k.shape}")
    if q.shape[2] % k.shape[2]:
        raise KernelInputError(f"q heads ({q.shape[2]}) must be a multiple of k/v heads "
                               f"({k.shape[2]})")


def band(causal, window):
    """(left, right) limits on i - j and j - i, None meaning unbounded."""
    left = right = None
    if window is not None:
        pair = (window, window) if isinstance(window, int) else tuple(window)
        if len(pair) != 2 or not all(isinstance(w, int) and not isinstance(w, bool) and w >= 0
                                     for w in pair):
            raise KernelInputError(f"window must be an int >= 0 or a pair (left, right) of "
                                   f"them; got {window!r}")
        left, right = pair
    if causal:
        right = 0
    return left, right


def segments(segment_ids, batch, seq_q, seq_k):
    """segment_ids [B, T] (self-attention) or a pair ([B, T], [B, S]) -> int32 arrays."""
    if segment_ids is None:
        return None, None
    if isinstance(segment_ids, (tuple, list)):
        if len(segment_ids) != 2:
            raise KernelInputError("segment_ids must be an array or a pair (q_ids, kv_ids)")
        seg_q, seg_k = segment_ids
    else:
        if seq_q != seq_k:
            raise KernelInputError(f"one segment_ids array needs seq == seq_kv (got {seq_q} "
                                   f"and {seq_k}); pass a pair (q_ids, kv_ids)")
        seg_q = seg_k = segment_ids
    for name, ids, length in (("segment_ids (query)", seg_q, seq_q),
                              ("segment_ids (key)", seg_k, seq_k)):
        if tuple(getattr(ids, "shape", ())) != (batch, length):
            raise KernelInputError(f"{name} must have shape {(batch, length)}; got "
                                   f"{getattr(ids, 'shape', type(ids).__name__)}")
        if not jnp.issubdtype(ids.dtype, jnp.integer):
            raise KernelInputError(f"{name} must be integers; got {ids.dtype}")
    return jnp.asarray(seg_q, jnp.int32), jnp.asarray(seg_k, jnp.int32)


def softmax_scale(sm_scale, head_dim) -> float:
    """sm_scale is static (it is folded into the kernel): a Python number, default 1/sqrt(D)."""
    if sm_scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(sm_scale, bool) or not isinstance(sm_scale, (int, float)):
        raise KernelInputError(f"sm_scale must be a Python float or None; got {sm_scale!r}")
    return float(sm_scale)
