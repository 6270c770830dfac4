"""RetNet's multi-scale retention (Sun et al. 2023, sec. 2) as a token mixer ("retnet").

Per head h, decay gamma_h = 1 - 2**(-5 - h), queries scaled by d**-0.5:

    parallel:    o = (q k^T * D) v,        D_ts = gamma^(t - s) for s <= t, else 0
    recurrent:   S_t = gamma S_{t-1} + k_t v_t^T,   o_t = q_t S_t
    chunkwise:   parallel inside a chunk, the recurrence between chunks

`retention` computes fla's `naive_retention` in [batch, length, heads, dim] layout. The
recurrence is SSD's with a constant scalar decay per head (X = v, B = k, C = q, A = log
gamma), so the recurrent and chunkwise modes are `ssd_reference` and `ssd` of ssm_scan.py.
The mixer adds RoPE on q and k (RetNet's xPos without its length extrapolation term), a
per-head GroupNorm and a swish output gate.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxcourse.errors import UserError
from jaxcourse.models.layers import apply_rope, partitioned
from jaxcourse.models.ssm_scan import check_chunk, ssd, ssd_reference

RETENTION_MODES = ("parallel", "recurrent", "chunkwise")


def retention_gammas(n_heads: int):
    return 1.0 - 2.0 ** (-5.0 - jnp.arange(n_heads, dtype=jnp.float32))


def retention(q, k, v, mode: str = "parallel", *, chunk: int = 16):
    """Retention of q, k [b, l, h, K] and v [b, l, h, V] -> o [b, l, h, V] (any mode)."""
    return retention_with_state(q, k, v, mode=mode, chunk=chunk)[0]


def retention_with_state(q, k, v, *, mode: str = "chunkwise", chunk: int = 16,
                         initial_state=None):
    """(o, final state [b, h, V, K]) continuing from `initial_state` (decoding)."""
    if mode not in RETENTION_MODES:
        raise UserError(f"retention mode={mode!r} is not one of {', '.join(RETENTION_MODES)}")
    b, l, h, dk = q.shape
    if k.shape != q.shape or v.shape[:3] != (b, l, h):
        raise UserError(f"retention: q {q.shape}, k {k.shape}, v {v.shape} must be "
                        "[b, l, h, K], [b, l, h, K], [b, l, h, V]")
    dtype_in = v.dtype
    q = q.astype(jnp.float32) * dk ** -0.5
    k, v = k.astype(jnp.float32), v.astype(jnp.float32)
    log_gamma = jnp.broadcast_to(jnp.log(retention_gammas(h)), (b, l, h))
    if mode == "parallel":
        o, state = _parallel(q, k, v, log_gamma[0, 0], initial_state)
    elif mode == "recurrent":
        o, state = ssd_reference(v, log_gamma, k, q, initial_states=initial_state)
    else:
        o, state = ssd(v, log_gamma, k, q, check_chunk(chunk), initial_states=initial_state)
    return o.astype(dtype_in), state


def _parallel(q, k, v, log_gamma_H, S0):
    l = q.shape[1]
    t = jnp.arange(l, dtype=jnp.float32)
    causal = t[:, None] >= t[None, :]
    decay_HxTxS = jnp.where(causal, jnp.exp(log_gamma_H[:, None, None]
                                            * jnp.where(causal, t[:, None] - t[None, :], 0)),
                            0.0)
    o = jnp.einsum("bthk,bshk,hts,bshv->bthv", q, k, decay_HxTxS, v)
    to_end_HxS = jnp.exp(log_gamma_H[:, None] * (l - 1 - t))
    state = jnp.einsum("bshk,hs,bshv->bhvk", k, to_end_HxS, v)
    if S0 is not None:  # the carried state, decayed by gamma^(t+1), read by each query
        from_start = jnp.exp(log_gamma_H[:, None] * (t + 1))
        o = o + jnp.einsum("bthk,ht,bhvk->bthv", q, from_start, S0)
        state = state + jnp.exp(log_gamma_H * l)[:, None, None] * S0
    return o, state


@dataclasses.dataclass(frozen=True)
class RetNetOptions:
    value_factor: int = 2          # Value head dim = value_factor * key head dim (paper: 2).
    mode: str = "chunkwise"        # Training / prefill form; decoding is always recurrent.
    chunk: int = 16

    def __post_init__(self):
        if self.mode not in RETENTION_MODES:
            raise UserError(f"model.retnet.mode={self.mode!r} is not one of "
                            f"{', '.join(RETENTION_MODES)}")
        check_chunk(self.chunk, "model.retnet.chunk")
        if self.value_factor < 1:
            raise UserError("model.retnet.value_factor must be >= 1")


class MultiScaleRetention(nn.Module):
    cfg: object
    opts: RetNetOptions
    Options = RetNetOptions
    slot_name = "retention"

    @classmethod
    def from_config(cls, cfg, options, *, name, causal=True, deterministic=True):
        if not causal:
            raise UserError("model.mixer='retnet' is causal only")
        return cls(cfg, options, name=name)

    @classmethod
    def init_cache(cls, cfg, options, batch_size, length, dtype):
        dv = options.value_factor * cfg.head_dim
        return {"state": jnp.zeros((batch_size, cfg.n_head, dv, cfg.head_dim), jnp.float32)}

    def _proj(self, heads, dim, name):
        c = self.cfg
        return nn.DenseGeneral((heads, dim), use_bias=False, dtype=c.compute_dtype, name=name,
                               dot_general=c.dot_general,
                               kernel_init=partitioned(nn.initializers.xavier_uniform(),
                                                       ("embed", "heads", "head_dim")))

    @nn.compact
    def __call__(self, x_BxTxD, *, positions_T, kv_valid=None, cache=None, cache_index=None):
        c, o = self.cfg, self.opts
        h, dk = c.n_head, c.head_dim
        dv = o.value_factor * dk
        q = apply_rope(self._proj(h, dk, "query")(x_BxTxD), positions_T, c.rope_base)
        k = apply_rope(self._proj(h, dk, "key")(x_BxTxD), positions_T, c.rope_base)
        v = self._proj(h, dv, "value")(x_BxTxD)
        g = self._proj(h, dv, "gate")(x_BxTxD)
        mode = o.mode if cache is None else "chunkwise"
        chunk = min(o.chunk, 1 << max(x_BxTxD.shape[1] - 1, 0).bit_length())
        y, state = retention_with_state(q, k, v, mode=mode, chunk=chunk,
                                        initial_state=None if cache is None else cache["state"])
        y32 = y.astype(jnp.float32)  # GroupNorm per head (RetNet sec. 2.2)
        mean = y32.mean(-1, keepdims=True)
        y32 = (y32 - mean) * jax.lax.rsqrt(jnp.square(y32 - mean).mean(-1, keepdims=True)
                                           + 1e-5)
        scale = self.param("group_norm_scale", partitioned(nn.initializers.ones,
                                                           ("heads", "head_dim")), (h, dv))
        y = (y32 * scale).astype(x_BxTxD.dtype) * nn.silu(g)
        out = nn.DenseGeneral(c.d_model, axis=(-2, -1), use_bias=False, dtype=c.compute_dtype,
                              name="out", dot_general=c.dot_general,
                              kernel_init=partitioned(nn.initializers.xavier_uniform(),
                                                      ("heads", "head_dim", "embed")))(y)
        return out, None if cache is None else {"state": state}
