"""Multi-head / multi-query / grouped-query attention with a choice of implementation.

Shapes: q is [B, T, H, D]; k and v are [B, S, K, D] with K kv heads dividing H heads
(K == H: MHA, Vaswani et al. 2017; K == 1: MQA, Shazeer 2019; otherwise GQA, Ainslie et
al. 2023). Query head h reads kv head h // (H // K), the grouping that
jax.nn.dot_product_attention uses, so every implementation agrees. The mixer's KV cache is
heads-major, [B, K, S, D]; a one-token decode step over it is `decode_attention`.

Implementations (`impl`):
    "einsum"  plain jnp reference; the only one that can hand back attention probabilities.
    "xla"     jax.nn.dot_product_attention(implementation="xla").
    "cudnn"   jax.nn.dot_product_attention(implementation="cudnn"); NVIDIA GPUs only.
    "pallas"  pallas_kernels.flash_attention (FlashAttention-2 tiling); interpret mode on CPU.

A sliding window W > 0 lets query i see keys i-W+1 .. i (itself and W-1 before it), as in
Mistral 7B / Longformer; W = 0 means no window.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxcourse.errors import UserError
from jaxcourse.models.layers import apply_rope, kernel_init, pallas_kernel, partitioned
from jaxcourse.quant import kv as kv_quant

ATTENTION_IMPLS = ("einsum", "xla", "cudnn", "pallas")


def attention_mask(q_pos, k_pos_S, *, causal: bool, window: int, kv_valid_BxS=None):
    """Boolean [B|1, T, S] mask, True where query t may attend to key s; q_pos is [T], or
    [B, T] for rows at their own positions."""
    q, k = q_pos[..., :, None], k_pos_S
    mask = jnp.ones((*q_pos.shape, k_pos_S.shape[0]), bool)
    if causal:
        mask &= k <= q
    if window > 0:
        mask &= k > q - window
        if not causal:  # Bidirectional attention gets a symmetric window.
            mask &= k < q + window
    mask = mask if mask.ndim == 3 else mask[None]
    if kv_valid_BxS is not None:
        mask = mask & kv_valid_BxS[:, None, :].astype(bool)
    return mask


def einsum_attention(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, mask, scale):
    """Reference attention; returns (out [B,T,H,D], probs [B,H,T,S]). Softmax in float32."""
    b, t, h, d = q_BxTxHxD.shape
    kvh = k_BxSxKxD.shape[2]
    q_BxTxKxGxD = q_BxTxHxD.reshape(b, t, kvh, h // kvh, d)
    logits = jnp.einsum("btkgd,bskd->bkgts", q_BxTxKxGxD, k_BxSxKxD,
                        preferred_element_type=jnp.float32) * scale
    if mask is not None:
        # A finite "minus infinity": a fully masked row gives a uniform row, not NaN.
        logits = jnp.where(mask[:, None, None], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(v_BxSxKxD.dtype), v_BxSxKxD)
    return out.reshape(b, t, h, d), probs.reshape(b, h, t, -1)


def decode_attention(q_Bx1xHxD, k_BxKxSxD, v_BxKxSxD, mask, scale):
    """One query per row over a heads-major KV cache; returns (out [B,1,H,D], probs
    [B,H,1,S]), the numbers of `einsum_attention`. `mask`: [B|1, 1, S]."""
    b, _, h, d = q_Bx1xHxD.shape
    kvh, s = k_BxKxSxD.shape[1], k_BxKxSxD.shape[2]
    q_BxKxGxD = q_Bx1xHxD.reshape(b, kvh, h // kvh, d)
    logits_BxKxGxS = jnp.einsum("bkgd,bksd->bkgs", q_BxKxGxD, k_BxKxSxD,
                                preferred_element_type=jnp.float32) * scale
    if mask is not None:
        logits_BxKxGxS = jnp.where(mask[:, None], logits_BxKxGxS, jnp.finfo(jnp.float32).min)
    probs_BxKxGxS = jax.nn.softmax(logits_BxKxGxS, axis=-1)
    out_BxKxGxD = jnp.einsum("bkgs,bksd->bkgd", probs_BxKxGxS.astype(v_BxKxSxD.dtype),
                             v_BxKxSxD)
    return out_BxKxGxD.reshape(b, 1, h, d), probs_BxKxGxS.reshape(b, h, 1, s)


def dot_product_attention(q, k, v, *, impl: str = "einsum", causal: bool = True,
                          window: int = 0, q_positions=None, kv_valid=None, scale=None):
    """Attention of q [B,T,H,D] over k, v [B,S,K,D]; returns (out [B,T,H,D], probs | None).

    Keys sit at positions 0..S-1. q_positions [T] or [B, T] (default arange(T)) places the
    queries among them: the KV-cache decode passes them so new tokens see the whole cache.
    kv_valid [B,S] marks real (non-padding) keys.
    """
    if impl not in ATTENTION_IMPLS:
        raise UserError(f"unknown attention impl {impl!r}; choose one of {ATTENTION_IMPLS}")
    h, kvh = q.shape[2], k.shape[2]
    if h % kvh:
        raise UserError(f"n_head={h} is not a multiple of n_kv_head={kvh}")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    t, s = q.shape[1], k.shape[1]
    plain = q_positions is None and kv_valid is None and (t == s or not causal)
    if impl in ("cudnn", "pallas") and not plain:
        # The fused kernels take whole aligned sequences; decode steps and padding masks
        # use XLA's attention, which takes an explicit mask and computes the same numbers.
        impl = "xla"
    if impl == "pallas":
        return _pallas_attention(q, k, v, causal=causal, window=window, scale=scale), None
    if impl == "cudnn" and jax.default_backend() != "gpu":
        raise UserError(f"attention impl 'cudnn' needs an NVIDIA GPU, not "
                        f"{jax.default_backend()}; use 'xla' or 'einsum'")
    q_pos = jnp.arange(t) if q_positions is None else q_positions
    mask = None
    if causal or window or kv_valid is not None:
        mask = attention_mask(q_pos, jnp.arange(s), causal=causal, window=window,
                              kv_valid_BxS=kv_valid)
    if impl == "einsum":
        return einsum_attention(q, k, v, mask, scale)
    if plain:  # Let the library build the mask: cuDNN then skips masked tiles entirely.
        local = None
        if window:
            local = (window - 1, 0) if causal else (window - 1, window - 1)
        out = jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=causal,
                                           local_window_size=local, implementation=impl)
        return out, None
    out = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], scale=scale,
                                       implementation="xla")
    return out, None


def _pallas_attention(q, k, v, *, causal, window, scale):
    band = None  # The kernel's window is (left, right) in keys, inclusive.
    if window:
        band = (window - 1, 0 if causal else window - 1)
    # interpret=None: compiled on GPU, interpret mode elsewhere (the only way CPU runs it).
    return pallas_kernel("flash_attention")(q, k, v, causal=causal, sm_scale=scale,
                                            window=band, segment_ids=None, interpret=None)


class Attention(nn.Module):
    """Self- or cross-attention with optional RoPE and an explicit KV cache.

    With a cache ({"k", "v": [B,K,S,D]}, heads-major) and `cache_index` (positions already
    filled: a scalar, or [B] with each row at its own fill level), the new keys/values are
    written at cache_index.. and the updated cache is returned. Heads-major because a
    decode step's dots then read each kv head's keys as one contiguous [S, D] matrix: laid
    out [B,S,K,D], XLA on CPU copied the whole cache into that layout every decode step
    (at 32 serving slots, most of the step; 0.29 vs 0.71 ms for one layer's attention in a
    microbenchmark). The cache is plain data passed in and out, not a hidden mutable collection,
    so decode loops stay pure functions that scan and jit cleanly.
    """
    n_head: int
    n_kv_head: int
    head_dim: int
    d_model: int
    impl: str = "einsum"
    causal: bool = True
    window: int = 0
    rope: bool = False
    rope_base: float = 10000.0
    use_bias: bool = False
    dtype: jnp.dtype = jnp.float32
    dot_general: object = None     # None: lax.dot_general; or e.g. bf16_dot_general.
    weight_init: str = "xavier"    # layers.kernel_init kind of the four projections.

    slot_name = "attention"        # The block's mixer slot (models/registry.py).

    @classmethod
    def from_config(cls, cfg, options=None, *, name, causal=True, deterministic=True):
        """Self-attention as the block's token mixer, sized by the model config."""
        del options, deterministic
        return cls(cfg.n_head, cfg.kv_heads, cfg.head_dim, cfg.d_model, impl=cfg.attention,
                   causal=causal, window=cfg.window, rope=cfg.pos == "rope",
                   rope_base=cfg.rope_base, use_bias=cfg.bias, dtype=cfg.compute_dtype,
                   dot_general=cfg.dot_general, weight_init=cfg.init, name=name)

    @classmethod
    def init_cache(cls, cfg, options, batch_size: int, length: int, dtype) -> dict:
        """An empty KV cache: {"k", "v": [B, K, length, D]} (the state grows with length);
        dtype int8 adds per-token, per-head scales {"k_scale", "v_scale": [B, K, length]}
        (quant/kv.py)."""
        del options
        shape = (batch_size, cfg.kv_heads, length, cfg.head_dim)
        if jnp.dtype(dtype) == jnp.int8:
            return kv_quant.init_int8_cache(shape)
        return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}

    def _proj(self, heads, names, name):
        return nn.DenseGeneral(
            (heads, self.head_dim), use_bias=self.use_bias, dtype=self.dtype, name=name,
            dot_general=self.dot_general,
            kernel_init=partitioned(kernel_init(self.weight_init), names),
            bias_init=partitioned(nn.initializers.zeros, names[1:]))

    @nn.compact
    def __call__(self, x_BxTxD, positions_T, *, context_BxSxD=None, kv_valid=None,
                 cache=None, cache_index=None):
        cross = context_BxSxD is not None
        src_BxSxD = context_BxSxD if cross else x_BxTxD
        q = self._proj(self.n_head, ("embed", "heads", "head_dim"), "query")(x_BxTxD)
        k = self._proj(self.n_kv_head, ("embed", "kv_heads", "head_dim"), "key")(src_BxSxD)
        v = self._proj(self.n_kv_head, ("embed", "kv_heads", "head_dim"), "value")(src_BxSxD)
        if self.rope and not cross:
            q = apply_rope(q, positions_T, self.rope_base)
            k = apply_rope(k, positions_T, self.rope_base)
        q_positions, new_cache = None, None
        if cache is not None:
            if cross:
                raise ValueError("a KV cache is for self-attention only")
            new_cache, k_BxKxSxD, v_BxKxSxD = _update_cache(cache, k, v, cache_index)
            q_positions = positions_T
        if cache is not None and x_BxTxD.shape[1] == 1:  # a decode step
            mask = attention_mask(q_positions, jnp.arange(k_BxKxSxD.shape[2]),
                                  causal=self.causal, window=self.window, kv_valid_BxS=kv_valid)
            out, probs = decode_attention(q, k_BxKxSxD.astype(q.dtype),
                                          v_BxKxSxD.astype(q.dtype), mask, self.head_dim ** -0.5)
            probs = probs if self.impl == "einsum" else None
        else:
            if cache is not None:
                k, v = jnp.swapaxes(k_BxKxSxD, 1, 2), jnp.swapaxes(v_BxKxSxD, 1, 2)
            out, probs = dot_product_attention(
                q, k.astype(q.dtype), v.astype(q.dtype), impl=self.impl,
                causal=self.causal and not cross, window=0 if cross else self.window,
                q_positions=q_positions, kv_valid=kv_valid)
        if probs is not None:  # A no-op unless "intermediates" is mutable (attention maps).
            self.sow("intermediates", "attention_probs", probs)
        out = nn.DenseGeneral(
            self.d_model, axis=(-2, -1), use_bias=self.use_bias, dtype=self.dtype, name="out",
            dot_general=self.dot_general,
            kernel_init=partitioned(kernel_init(self.weight_init), ("heads", "head_dim", "embed")),
            bias_init=partitioned(nn.initializers.zeros, ("embed",)))(out)
        return out, new_cache


def _update_cache(cache, k, v, index):
    """Writes k, v [B,T,K,D] at `index` (scalar or [B]) of the heads-major cache; returns
    (new cache, full keys, full values [B,K,S,D]). Only the new positions are written (a
    dynamic-update-slice; per row, a scatter), so a decode loop's carried cache is updated
    in place."""
    def put(name, x):  # x: [B, K, T, ...]
        x = x.astype(cache[name].dtype)
        if jnp.ndim(index) == 1:
            return jax.vmap(lambda c, r, i: jax.lax.dynamic_update_slice_in_dim(c, r, i, 1))(
                cache[name], x, index)
        return jax.lax.dynamic_update_slice_in_dim(cache[name], x, index, axis=2)
    k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)                # [B, K, T, D]
    if "k_scale" not in cache:
        new = {"k": put("k", k), "v": put("v", v)}
        return new, new["k"], new["v"]
    (qk, sk), (qv, sv) = kv_quant.quantize_kv(k), kv_quant.quantize_kv(v)
    new = {"k": put("k", qk), "v": put("v", qv), "k_scale": put("k_scale", sk),
           "v_scale": put("v_scale", sv)}
    return (new, kv_quant.dequantize_kv(new["k"], new["k_scale"], k.dtype),
            kv_quant.dequantize_kv(new["v"], new["v_scale"], v.dtype))
