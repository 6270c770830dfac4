"""RWKV-6 ("Finch", Peng et al. 2024): time-mix with data-dependent decay, and channel-mix.

The WKV-6 recurrence, per head, with a matrix state S [K, V]:

    o_t = (r_t * scale) . (S_{t-1} + (u * k_t) v_t^T)           (u: the "bonus" of token t)
    S_t = diag(exp(w_t)) S_{t-1} + k_t v_t^T                    (w_t <= 0: log decay)

`wkv6` computes the function of fla's `naive_recurrent_rwkv6` in [batch, length, heads, dim]
layout. Its default chunked form splits time into chunks: inside a chunk the pairwise decays
exp(sum of w between s and t) are formed directly (every exponent <= 0, so no overflow,
whatever the decay), states pass between chunks by a short scan; `impl="recurrent"` is the
scan over time (the oracle).

The time-mix (the mixer "rwkv") interpolates each token with the previous one ("token shift")
by data-dependent amounts (a low-rank "ddlerp"), and makes the decay w_t itself a low-rank
function of the input. The channel-mix (the ffn "rwkv_cmix") is a token-shifted squared-ReLU
MLP with a sigmoid receptance gate.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxcourse.errors import UserError
from jaxcourse.models.layers import partitioned
from jaxcourse.models.ssm_scan import check_chunk

WKV_IMPLS = ("chunked", "recurrent")


def _check(r, k, v, w, u):
    b, l, h, dk = r.shape
    if k.shape != r.shape or w.shape != r.shape or v.shape[:3] != (b, l, h) or u.shape != (h, dk):
        raise UserError(f"wkv6: r {r.shape}, k {k.shape}, w {w.shape} must be [b, l, h, K], "
                        f"v {v.shape} [b, l, h, V] and u {u.shape} [h, K]")


def wkv6(r, k, v, w, u, scale=1.0, initial_state=None, *, impl: str = "chunked",
         chunk: int = 16):
    """(o [b, l, h, V], final state [b, h, K, V]); decay = exp(w). Float32 inside."""
    _check(r, k, v, w, u)
    if impl not in WKV_IMPLS:
        raise UserError(f"wkv6 impl={impl!r} is not one of {', '.join(WKV_IMPLS)}")
    b, _, h, dk = r.shape
    dtype_in = v.dtype
    r, k, v, w, u = (x.astype(jnp.float32) for x in (r, k, v, w, u))
    r = r * scale
    S0 = (jnp.zeros((b, h, dk, v.shape[-1]), jnp.float32) if initial_state is None
          else initial_state.astype(jnp.float32))
    if impl == "recurrent":
        o, S = _recurrent(r, k, v, w, u, S0)
    else:
        o, S = _chunked(r, k, v, w, u, S0, check_chunk(chunk))
    return o.astype(dtype_in), S


def _recurrent(r, k, v, w, u, S0):
    def step(S_BxHxKxV, xs):
        r_t, k_t, v_t, w_t = xs
        kv = k_t[..., :, None] * v_t[..., None, :]
        o_t = jnp.einsum("bhk,bhkv->bhv", r_t, S_BxHxKxV + u[..., None] * kv)
        return jnp.exp(w_t)[..., None] * S_BxHxKxV + kv, o_t

    S, o = jax.lax.scan(step, S0, [jnp.moveaxis(x, 1, 0) for x in (r, k, v, w)])
    return jnp.moveaxis(o, 0, 1), S


def _chunked(r, k, v, w, u, S0, chunk):
    b, l, h, _ = r.shape
    chunk = min(chunk, 1 << max(l - 1, 0).bit_length())
    pad = -l % chunk  # identity steps: w = 0 (decay 1), k = v = 0
    r, k, v, w = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (r, k, v, w))
    nc = r.shape[1] // chunk
    r, k, v, w = (x.reshape(b, nc, chunk, h, x.shape[-1]) for x in (r, k, v, w))
    a = jnp.cumsum(w, axis=2)          # log decay from the chunk start through step t
    # ... through step t - 1, shifted rather than a - w: then a_before_t - a_{t-1} is exactly
    # 0 however large |a| grows (a - w loses the low bits of w when decays are strong).
    a_before = jnp.pad(a[:, :, :-1], ((0, 0), (0, 0), (1, 0), (0, 0), (0, 0)))
    # Token s < t reaches token t decayed by exp(a_before_t - a_s) (<= 1).
    strict = jnp.tril(jnp.ones((chunk, chunk), bool), -1)[:, :, None, None]
    diff = a_before[:, :, :, None] - a[:, :, None, :]          # [b, c, t, s, h, K]
    decay = jnp.where(strict, jnp.exp(jnp.where(strict, diff, 0.0)), 0.0)
    att = jnp.einsum("bcthk,bcshk,bctshk->bchts", r, k, decay)
    o = jnp.einsum("bchts,bcshv->bcthv", att, v)
    o = o + jnp.einsum("bcthk,hk,bcthk->bcth", r, u, k)[..., None] * v
    # The state each chunk adds (decayed to its end), and its total decay.
    local = jnp.einsum("bcshk,bcshv->bchkv", k * jnp.exp(a[:, :, -1:] - a), v)
    total = jnp.exp(a[:, :, -1])                               # [b, c, h, K]

    def carry(S, xs):
        local_c, total_c = xs
        return total_c[..., None] * S + local_c, S

    S, entering = jax.lax.scan(carry, S0, (jnp.moveaxis(local, 1, 0), jnp.moveaxis(total, 1, 0)))
    o = o + jnp.einsum("bcthk,cbhkv->bcthv", r * jnp.exp(a_before), entering)
    return o.reshape(b, nc * chunk, h, -1)[:, :l], S


def wkv6_reference(r, k, v, w, u, scale=1.0, initial_state=None):
    """The recurrence over time (the oracle of the chunked form and of any kernel)."""
    return wkv6(r, k, v, w, u, scale, initial_state, impl="recurrent")


# ---------------------------------------------------------------------------------------
# The time-mix and channel-mix sublayers.

@dataclasses.dataclass(frozen=True)
class RWKVOptions:
    head_size: int = 0             # 0: the model's head_dim (d_model / n_head).
    mix_rank: int = 32             # Rank of the data-dependent token-shift (ddlerp) LoRA.
    decay_rank: int = 64           # Rank of the data-dependent decay LoRA.
    chunk: int = 16

    def __post_init__(self):
        check_chunk(self.chunk, "model.rwkv.chunk")
        if self.head_size < 0 or self.mix_rank < 1 or self.decay_rank < 1:
            raise UserError("model.rwkv.head_size must be >= 0, mix_rank, decay_rank >= 1")


def _token_shift(x_BxTxD, last_BxD):
    """The previous token of every position (the cached last token before the first)."""
    prev = jnp.zeros_like(x_BxTxD[:, :1]) if last_BxD is None else last_BxD[:, None]
    return jnp.concatenate([prev.astype(x_BxTxD.dtype), x_BxTxD[:, :-1]], axis=1)


def _ramp(d: int, power: float):
    """A per-channel init in [0, 1): channel i gets 1 - (i / d) ** power, as RWKV does."""
    return lambda key, shape: 1.0 - (jnp.arange(d, dtype=jnp.float32) / d) ** power


def _small(scale=1e-4):
    return nn.initializers.uniform(2 * scale)


class RWKV6TimeMix(nn.Module):
    cfg: object
    opts: RWKVOptions
    Options = RWKVOptions
    slot_name = "rwkv"

    @classmethod
    def from_config(cls, cfg, options, *, name, causal=True, deterministic=True):
        if not causal:
            raise UserError("model.mixer='rwkv' is causal only")
        size = options.head_size or cfg.head_dim
        if cfg.d_model % size:
            raise UserError(f"model.rwkv.head_size={size} does not divide d_model="
                            f"{cfg.d_model}")
        return cls(cfg, options, name=name)

    @classmethod
    def init_cache(cls, cfg, options, batch_size, length, dtype):
        size = options.head_size or cfg.head_dim
        h = cfg.d_model // size
        return {"shift": jnp.zeros((batch_size, cfg.d_model), dtype),
                "wkv": jnp.zeros((batch_size, h, size, size), jnp.float32)}

    def _dense(self, features, name):
        c = self.cfg
        return nn.Dense(features, use_bias=False, dtype=c.compute_dtype, name=name,
                        dot_general=c.dot_general,
                        kernel_init=partitioned(nn.initializers.lecun_normal(),
                                                ("embed", "mlp")))

    @nn.compact
    def __call__(self, x_BxTxD, *, positions_T=None, kv_valid=None, cache=None,
                 cache_index=None):
        o = self.opts
        b, t, d = x_BxTxD.shape
        size = o.head_size or self.cfg.head_dim
        h = d // size
        dx = _token_shift(x_BxTxD, None if cache is None else cache["shift"]) - x_BxTxD
        maa_x = self.param("maa_x", _ramp(d, 0.5), (d,))
        maa = self.param("maa_wkvrg", lambda k, s: jnp.stack(
            [_ramp(d, p)(k, (d,)) for p in (0.3, 0.5, 0.7, 0.9, 0.4)]), (5, d))
        w1 = self.param("maa_w1", _small(), (d, 5 * o.mix_rank))
        w2 = self.param("maa_w2", _small(), (5, o.mix_rank, d))
        lora = jnp.tanh((x_BxTxD + dx * maa_x) @ w1).reshape(b, t, 5, o.mix_rank)
        mix = jnp.einsum("btfr,frd->btfd", lora, w2) + maa
        xw, xk, xv, xr, xg = (x_BxTxD + dx * mix[:, :, i] for i in range(5))
        r = self._dense(d, "receptance")(xr).reshape(b, t, h, size)
        k = self._dense(d, "key")(xk).reshape(b, t, h, size)
        v = self._dense(d, "value")(xv).reshape(b, t, h, size)
        g = nn.silu(self._dense(d, "gate")(xg))
        decay = self.param("time_decay", lambda k, s: -6.0 + 5.0 * (
            jnp.arange(d, dtype=jnp.float32) / max(d - 1, 1)) ** 0.85, (d,))
        dw1 = self.param("decay_w1", _small(), (d, o.decay_rank))
        dw2 = self.param("decay_w2", _small(), (o.decay_rank, d))
        w = decay + jnp.tanh(xw.astype(jnp.float32) @ dw1) @ dw2
        u = self.param("time_faaaa", lambda k, s: 0.5 * _ramp(d, 0.5)(k, (d,)).reshape(s),
                       (h, size))
        y, state = wkv6(r, k, v, -jnp.exp(w).reshape(b, t, h, size), u,
                        initial_state=None if cache is None else cache["wkv"], chunk=o.chunk)
        y = _group_norm(self, y, h, size) * g
        out = nn.Dense(d, use_bias=False, dtype=self.cfg.compute_dtype, name="output",
                       dot_general=self.cfg.dot_general,
                       kernel_init=partitioned(nn.initializers.lecun_normal(),
                                               ("mlp", "embed")))(y)
        new = None if cache is None else {"shift": x_BxTxD[:, -1].astype(cache["shift"].dtype),
                                          "wkv": state}
        return out, new


def _group_norm(module, y_BxTxHxK, h, size, eps=64e-5):
    """Per-head LayerNorm of the WKV output (RWKV's ln_x, a GroupNorm with one group a
    head; eps as in RWKV-6)."""
    y = y_BxTxHxK.astype(jnp.float32)
    mean = y.mean(-1, keepdims=True)
    var = jnp.square(y - mean).mean(-1, keepdims=True)
    y = ((y - mean) * jax.lax.rsqrt(var + eps)).reshape(y.shape[:2] + (h * size,))
    scale = module.param("ln_x_scale", nn.initializers.ones, (h * size,))
    bias = module.param("ln_x_bias", nn.initializers.zeros, (h * size,))
    return (y * scale + bias).astype(y_BxTxHxK.dtype)


class RWKVChannelMix(nn.Module):
    """out = sigmoid(W_r x_r) * W_v relu(W_k x_k)^2, x_r and x_k token-shifted.

    An ffn with a decode state: the token shift needs the previous token's input, so the
    block calls it as `ffn(x, cache=...) -> (y, new cache)` and keeps {"shift": [B, D]}
    beside the mixer's cache (block.py); without a cache the shift sees zeros before the
    first token, as at the start of a cached decode, so decoding equals the full forward.
    """
    cfg: object
    slot_name = "rwkv_cmix"

    @classmethod
    def from_config(cls, cfg, options=None, *, name, deterministic=True):
        return cls(cfg, name=name)

    @classmethod
    def init_cache(cls, cfg, options, batch_size, length, dtype):
        return {"shift": jnp.zeros((batch_size, cfg.d_model), dtype)}

    @nn.compact
    def __call__(self, x_BxTxD, *, cache=None):
        c = self.cfg
        d = x_BxTxD.shape[-1]
        dx = _token_shift(x_BxTxD, None if cache is None else cache["shift"]) - x_BxTxD
        xk = x_BxTxD + dx * self.param("maa_k", _ramp(d, 0.5), (d,))
        xr = x_BxTxD + dx * self.param("maa_r", _ramp(d, 0.5), (d,))

        def dense(features, names, name):
            return nn.Dense(features, use_bias=False, dtype=c.compute_dtype, name=name,
                            dot_general=c.dot_general,
                            kernel_init=partitioned(nn.initializers.lecun_normal(), names))

        k = jnp.square(nn.relu(dense(c.ff_dim, ("embed", "mlp"), "key")(xk)))
        kv = dense(d, ("mlp", "embed"), "value")(k)
        y = nn.sigmoid(dense(d, ("embed", None), "receptance")(xr)) * kv
        new = None if cache is None else {"shift": x_BxTxD[:, -1].astype(cache["shift"].dtype)}
        return y, new
