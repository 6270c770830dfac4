"""int8 KV cache: one float32 scale per (batch, position, kv head), over the head dim.

Attention stores keys and values as int8 when its cache was made with dtype int8
(`model.init_cache(batch, length, jnp.int8)`) and dequantizes the cache for each step.
Memory per cached value: 1 byte + 4 bytes / head_dim of scale (vs 4 bytes in float32).
"""
from __future__ import annotations

import jax.numpy as jnp


def quantize_kv(x_BxTxKxD):
    """(int8 [B,T,K,D], float32 scale [B,T,K]): symmetric, per token and head."""
    scale_BxTxK = jnp.max(jnp.abs(x_BxTxKxD), axis=-1).astype(jnp.float32) / 127.0
    scale_BxTxK = jnp.where(scale_BxTxK == 0, 1.0, scale_BxTxK)
    q = jnp.clip(jnp.round(x_BxTxKxD / scale_BxTxK[..., None]), -127, 127)
    return q.astype(jnp.int8), scale_BxTxK


def dequantize_kv(q_BxSxKxD, scale_BxSxK, dtype=jnp.float32):
    return (q_BxSxKxD.astype(jnp.float32) * scale_BxSxK[..., None]).astype(dtype)


def init_int8_cache(shape) -> dict:
    """An empty int8 KV cache for [B, S, K, D] keys and values."""
    return {"k": jnp.zeros(shape, jnp.int8), "v": jnp.zeros(shape, jnp.int8),
            "k_scale": jnp.ones(shape[:3], jnp.float32),
            "v_scale": jnp.ones(shape[:3], jnp.float32)}
