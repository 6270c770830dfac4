"""Multi-head latent attention (DeepSeek-V2, Liu et al. 2024, sec. 2.1) as a block mixer.

Keys and values come from one low-rank latent per token, c_kv = RMSNorm(x W_dkv) [B,T,R],
with per-head up-projections k_h = c_kv W_uk[h], v_h = c_kv W_uv[h] (eq. 9-11). RoPE does
not commute with W_uk, so position is carried by a decoupled part (eq. 14-19): every head
adds a rotated query q_rope_h [dr] against one rotated key k_rope [dr] shared by all heads.

    score_h(t, s) = (q_h(t) . k_h(s) + q_rope_h(t) . k_rope(s)) / sqrt(Dh + dr)

Decode caches only c_kv and k_rope: R + dr values per token and layer (MHA: 2 H Dh). With a
cache the up-projections are absorbed (sec. 2.1.2): the query becomes q_h W_uk[h]^T in latent
space, the output is the latent-space average times W_uv[h], and keys and values are never
materialized. Without a cache (training) the keys and values are materialized per head.
Options (`model.mla.*`): kv_rank R, rope_dim dr, q_rank (> 0: a low-rank query, eq. 12-13).
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxcourse.errors import UserError
from jaxcourse.models.attention import attention_mask
from jaxcourse.models.layers import Norm, apply_rope, partitioned


@dataclasses.dataclass(frozen=True)
class MLAOptions:
    kv_rank: int = 32              # R: the cached latent per token (DeepSeek-V2: 4 Dh).
    rope_dim: int = 16             # dr: the decoupled RoPE part of queries and the shared key.
    q_rank: int = 0                # 0: full-rank query projection; > 0: low-rank query.

    def __post_init__(self):
        if self.kv_rank < 1 or self.rope_dim < 2 or self.rope_dim % 2 or self.q_rank < 0:
            raise UserError("model.mla needs kv_rank >= 1, an even rope_dim >= 2 and "
                            "q_rank >= 0")


class MultiHeadLatentAttention(nn.Module):
    cfg: object
    opts: MLAOptions
    causal: bool = True
    Options = MLAOptions
    slot_name = "mla"

    @classmethod
    def from_config(cls, cfg, options, *, name, causal=True, deterministic=True):
        del deterministic
        if cfg.window:
            raise UserError("model.mixer='mla' has no sliding window (model.window=0)")
        return cls(cfg, options, causal=causal, name=name)

    @classmethod
    def init_cache(cls, cfg, options, batch_size, length, dtype):
        """The latent and the shared rope key: {"c_kv": [B,S,R], "k_rope": [B,S,dr]}."""
        return {"c_kv": jnp.zeros((batch_size, length, options.kv_rank), dtype),
                "k_rope": jnp.zeros((batch_size, length, options.rope_dim), dtype)}

    def _dense(self, features, names, name, axis=-1):
        c = self.cfg
        return nn.DenseGeneral(features, axis=axis, use_bias=False, dtype=c.compute_dtype,
                               name=name, dot_general=c.dot_general,
                               kernel_init=partitioned(nn.initializers.xavier_uniform(), names))

    def _norm(self, name):
        return Norm("rmsnorm", self.cfg.norm_impl, use_bias=False,
                    dtype=self.cfg.compute_dtype, name=name)

    @nn.compact
    def __call__(self, x_BxTxD, *, positions_T, kv_valid=None, cache=None, cache_index=None):
        c, o = self.cfg, self.opts
        h, dh, r, dr = c.n_head, c.head_dim, o.kv_rank, o.rope_dim
        if o.q_rank:
            x_q = self._norm("q_norm")(self._dense(o.q_rank, ("embed", "mlp"), "q_down")(x_BxTxD))
            q = self._dense((h, dh + dr), ("mlp", "heads", "head_dim"), "query")(x_q)
        else:
            q = self._dense((h, dh + dr), ("embed", "heads", "head_dim"), "query")(x_BxTxD)
        q_BxTxHxD, q_rope = q[..., :dh], apply_rope(q[..., dh:], positions_T, c.rope_base)
        down = self._dense(r + dr, ("embed", "mlp"), "kv_down")(x_BxTxD)
        c_BxTxR = self._norm("kv_norm")(down[..., :r])
        k_rope_BxTxR = apply_rope(down[..., None, r:], positions_T, c.rope_base)[:, :, 0]
        init = partitioned(nn.initializers.xavier_uniform(in_axis=0, out_axis=(1, 2)),
                           ("mlp", "heads", "head_dim"))
        w_uk_RxHxD = self.param("k_up", init, (r, h, dh)).astype(c.compute_dtype)
        w_uv_RxHxD = self.param("v_up", init, (r, h, dh)).astype(c.compute_dtype)
        scale = (dh + dr) ** -0.5
        new_cache, k_pos = None, positions_T
        if cache is not None:  # append the latent, then attend over the whole cache
            c_BxTxR = jax.lax.dynamic_update_slice_in_dim(
                cache["c_kv"], c_BxTxR.astype(cache["c_kv"].dtype), cache_index, axis=1)
            k_rope_BxTxR = jax.lax.dynamic_update_slice_in_dim(
                cache["k_rope"], k_rope_BxTxR.astype(cache["k_rope"].dtype), cache_index, 1)
            new_cache = {"c_kv": c_BxTxR, "k_rope": k_rope_BxTxR}
            k_pos = jnp.arange(c_BxTxR.shape[1])
            c_BxTxR, k_rope_BxTxR = (a.astype(q.dtype) for a in (c_BxTxR, k_rope_BxTxR))
        mask = attention_mask(positions_T, k_pos, causal=self.causal, window=0,
                              kv_valid_BxS=kv_valid)
        rope_logits = jnp.einsum("bthd,bsd->bhts", q_rope, k_rope_BxTxR,
                                 preferred_element_type=jnp.float32)
        if cache is None:  # materialized keys and values per head (training, full forward)
            k_BxSxHxD = jnp.einsum("bsr,rhd->bshd", c_BxTxR, w_uk_RxHxD)
            v_BxSxHxD = jnp.einsum("bsr,rhd->bshd", c_BxTxR, w_uv_RxHxD)
            logits = jnp.einsum("bthd,bshd->bhts", q_BxTxHxD, k_BxSxHxD,
                                preferred_element_type=jnp.float32) + rope_logits
            probs = _softmax(logits * scale, mask).astype(v_BxSxHxD.dtype)
            out_BxTxHxD = jnp.einsum("bhts,bshd->bthd", probs, v_BxSxHxD)
        else:  # absorbed: attention in latent space, nothing per head is cached
            q_lat_BxTxHxR = jnp.einsum("bthd,rhd->bthr", q_BxTxHxD, w_uk_RxHxD)
            logits = jnp.einsum("bthr,bsr->bhts", q_lat_BxTxHxR, c_BxTxR,
                                preferred_element_type=jnp.float32) + rope_logits
            probs = _softmax(logits * scale, mask).astype(c_BxTxR.dtype)
            out_lat = jnp.einsum("bhts,bsr->bthr", probs, c_BxTxR)
            out_BxTxHxD = jnp.einsum("bthr,rhd->bthd", out_lat, w_uv_RxHxD)
        out = self._dense(c.d_model, ("heads", "head_dim", "embed"), "out",
                          axis=(-2, -1))(out_BxTxHxD)
        return out, new_cache


def _softmax(logits_BxHxTxS, mask):
    logits = jnp.where(mask[:, None], logits_BxHxTxS, jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(logits, axis=-1)

