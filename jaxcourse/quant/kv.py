"""int8 KV cache: one float32 scale per (batch, kv head, position), over the head dim.

Attention stores keys and values as int8 when its cache was made with dtype int8
(`model.init_cache(batch, length, jnp.int8)`) and dequantizes the cache for each step.
Memory per cached value: 1 byte + 4 bytes / head_dim of scale (vs 4 bytes in float32).
"""
from __future__ import annotations

import jax.numpy as jnp


def quantize_kv(x_BxKxTxD):
    """(int8 [B,K,T,D], float32 scale [B,K,T]): symmetric, per token and head."""
    scale_BxKxT = jnp.max(jnp.abs(x_BxKxTxD), axis=-1).astype(jnp.float32) / 127.0
    scale_BxKxT = jnp.where(scale_BxKxT == 0, 1.0, scale_BxKxT)
    q = jnp.clip(jnp.round(x_BxKxTxD / scale_BxKxT[..., None]), -127, 127)
    return q.astype(jnp.int8), scale_BxKxT


def dequantize_kv(q_BxKxSxD, scale_BxKxS, dtype=jnp.float32):
    return (q_BxKxSxD.astype(jnp.float32) * scale_BxKxS[..., None]).astype(dtype)


def init_int8_cache(shape) -> dict:
    """An empty int8 KV cache for heads-major [B, K, S, D] keys and values."""
    return {"k": jnp.zeros(shape, jnp.int8), "v": jnp.zeros(shape, jnp.int8),
            "k_scale": jnp.ones(shape[:3], jnp.float32),
            "v_scale": jnp.ones(shape[:3], jnp.float32)}
