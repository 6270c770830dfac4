"""State-space token mixers: S4D, Mamba (selective SSM) and Mamba-2 (SSD).

Each is a mixer of the block (models/registry.py) with its own `Options` (`model.s4d.*`,
`model.mamba.*`, `model.mamba2.*`) and a fixed-size decode state made by `init_cache`, so
`decode.generate` samples from it with memory that does not grow with the context. The scans
themselves live in ssm_scan.py; `selective_scan` and `ssd` are re-exported here.

S4D (Gu et al. 2022, "On the parameterization and initialization of diagonal SSMs"): per
channel h, N/2 complex modes, zero-order-hold discretisation with step dt_h:

    dA = exp(dt A),  dB = (dA - 1) / A  (B = 1),   x_t = dA x_{t-1} + dB u_t,
    y_t = 2 Re(<C, x_t>) + D u_t  ==  (K * u)_t + D u_t,  K_l = 2 Re(sum_n C_n dB_n dA_n^l)

so training runs as one long causal convolution (FFT) and decoding as the recurrence.
Mamba (Gu & Dao 2023, Fig. 3): in_proj -> (x, z); x -> causal depthwise conv -> silu ->
selective scan with input-dependent dt, B, C -> * silu(z) -> out_proj.
Mamba-2 (Dao & Gu 2024, sec. 7): one projection gives z, x, B, C, dt; conv over (x, B, C);
SSD with a scalar decay per head; gated RMSNorm; out_proj.
"""
from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxcourse.errors import UserError
from jaxcourse.models.layers import partitioned, rms_norm
from jaxcourse.models.ssm_scan import (SCAN_IMPLS, check_chunk, check_state_size,
                                       selective_scan, ssd)

__all__ = ["selective_scan", "ssd", "S4D", "Mamba", "Mamba2", "causal_depthwise_conv"]


def causal_depthwise_conv(x_BxTxC, kernel_WxC, bias_C, tail_BxWxC):
    """y_t = sum_k kernel_k * x_{t - W + 1 + k} + bias, and the last W - 1 inputs (the decode
    state). A sum of W shifted slices: XLA's CPU convolutions are slow inside lax.scan."""
    t = x_BxTxC.shape[1]
    w = kernel_WxC.shape[0]
    padded = jnp.concatenate([tail_BxWxC.astype(x_BxTxC.dtype), x_BxTxC], axis=1)
    y = sum(kernel_WxC[k].astype(x_BxTxC.dtype) * padded[:, k:k + t] for k in range(w))
    return y + bias_C.astype(x_BxTxC.dtype), padded[:, t:]


def _dense(features, names, name, cfg, use_bias=False, init=None):
    return nn.Dense(features, use_bias=use_bias, dtype=cfg.compute_dtype, name=name,
                    dot_general=cfg.dot_general,
                    kernel_init=partitioned(init or nn.initializers.lecun_normal(), names),
                    bias_init=partitioned(nn.initializers.zeros, names[-1:]))


def _dt_bias_init(dt_min, dt_max):
    """Softplus^-1 of dt ~ log-uniform[dt_min, dt_max] (Mamba's dt initialisation)."""
    def init(key, shape, dtype=jnp.float32):
        dt = jnp.exp(jax.random.uniform(key, shape, dtype, math.log(dt_min), math.log(dt_max)))
        return dt + jnp.log(-jnp.expm1(-dt))
    return init


def _check_common(name, d_state, d_conv=1, expand=1):
    check_state_size(d_state, f"model.{name}.d_state")
    if d_conv < 1 or expand < 1:
        raise UserError(f"model.{name}.d_conv and expand must be >= 1")


# ---------------------------------------------------------------------------------------
# S4D.

@dataclasses.dataclass(frozen=True)
class S4DOptions:
    d_state: int = 64              # N: N/2 complex modes per channel.
    mode: str = "conv"             # Training: conv (FFT, the kernel) | recurrent (a scan).
    dt_min: float = 0.001
    dt_max: float = 0.1

    def __post_init__(self):
        _check_common("s4d", self.d_state)
        if self.d_state % 2:
            raise UserError(f"model.s4d.d_state={self.d_state} must be even (complex pairs)")
        if self.mode not in ("conv", "recurrent"):
            raise UserError(f"model.s4d.mode={self.mode!r} is not one of conv, recurrent")


def s4d_kernel(dt_H, A_HxN, C_HxN, length: int):
    """K [H, length]: K_l = 2 Re(sum_n C_n dB_n dA_n^l) (complex A, C; ZOH, B = 1)."""
    dtA = dt_H[:, None] * A_HxN
    dB = (jnp.exp(dtA) - 1.0) / A_HxN
    powers_HxNxL = jnp.exp(dtA[..., None] * jnp.arange(length))
    return 2.0 * jnp.einsum("hn,hnl->hl", C_HxN * dB, powers_HxNxL).real


def s4d_conv(u_BxTxH, K_HxT):
    """Causal convolution of every channel with its kernel, via a zero-padded FFT.

    The input and the kernel (as one more batch row) go through a single rfft, so one
    layer's forward and backward never run two FFTs at once. XLA:CPU (jaxlib 0.11) runs an
    FFT on a thread of its pool and fans it out into that same pool: with an FFT on every
    pool thread, all of them wait for a free thread for ever (the gradient of 3 layers at
    batch 64, context 256, width 384 hung on 2 cores; tests/test_ssm.py runs it)."""
    b, t = u_BxTxH.shape[:2]
    n = 2 * t
    both = jnp.concatenate([u_BxTxH, K_HxT.T[None].astype(u_BxTxH.dtype)])
    F = jnp.fft.rfft(both, n=n, axis=1)
    return jnp.fft.irfft(F[:b] * F[b:], n=n, axis=1)[:, :t]


def s4d_recurrent(u_BxTxH, dt_H, A_HxN, C_HxN, x0_BxHxN):
    """The same SSM as a recurrence over time; returns (y [B,T,H] without D u, last state)."""
    dA = jnp.exp(dt_H[:, None] * A_HxN)
    dB = (dA - 1.0) / A_HxN

    def step(x, u_BxH):
        x = dA * x + dB * u_BxH[..., None]
        return x, 2.0 * jnp.einsum("bhn,hn->bh", x, C_HxN).real

    last, y = jax.lax.scan(step, x0_BxHxN, jnp.moveaxis(u_BxTxH, 1, 0))
    return jnp.moveaxis(y, 0, 1), last


class S4D(nn.Module):
    """Diagonal SSM per channel (S4D-Lin init: A_n = -1/2 + i pi n), GELU, output Dense."""
    cfg: object
    opts: S4DOptions
    Options = S4DOptions
    slot_name = "s4d"

    @classmethod
    def from_config(cls, cfg, options, *, name, causal=True, deterministic=True):
        if not causal:
            raise UserError("model.mixer='s4d' is causal only")
        return cls(cfg, options, name=name)

    @classmethod
    def init_cache(cls, cfg, options, batch_size, length, dtype):
        shape = (batch_size, cfg.d_model, options.d_state // 2)  # float32 whatever `dtype`
        return {"re": jnp.zeros(shape, jnp.float32), "im": jnp.zeros(shape, jnp.float32)}

    @nn.compact
    def __call__(self, x_BxTxD, *, positions_T=None, kv_valid=None, cache=None,
                 cache_index=None):
        o, h, n2 = self.opts, x_BxTxD.shape[-1], self.opts.d_state // 2
        log_dt = self.param("log_dt", lambda k, s: jax.random.uniform(
            k, s, jnp.float32, math.log(o.dt_min), math.log(o.dt_max)), (h,))
        log_a_re = self.param("log_A_real", lambda k, s: jnp.full(s, math.log(0.5)), (h, n2))
        a_im = self.param("A_imag", lambda k, s: jnp.broadcast_to(
            math.pi * jnp.arange(n2, dtype=jnp.float32), s), (h, n2))
        c = self.param("C", nn.initializers.normal(0.5 ** 0.5), (h, n2, 2))
        d = self.param("D", nn.initializers.ones, (h,))
        A = -jnp.exp(log_a_re) + 1j * a_im
        C = c[..., 0] + 1j * c[..., 1]
        dt = jnp.exp(log_dt)
        u = x_BxTxD.astype(jnp.float32)
        new = None
        if cache is not None:
            y, last = s4d_recurrent(u, dt, A, C, cache["re"] + 1j * cache["im"])
            new = {"re": last.real, "im": last.imag}
        elif o.mode == "recurrent":
            y, _ = s4d_recurrent(u, dt, A, C, jnp.zeros(u.shape[:1] + (h, n2), jnp.complex64))
        else:
            y = s4d_conv(u, s4d_kernel(dt, A, C, u.shape[1]))
        y = nn.gelu(y + d * u).astype(x_BxTxD.dtype)
        return _dense(h, ("mlp", "embed"), "out", self.cfg)(y), new


# ---------------------------------------------------------------------------------------
# Mamba.

@dataclasses.dataclass(frozen=True)
class MambaOptions:
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: int = 0               # 0: ceil(d_model / 16).
    scan: str = "analytic"         # selective_scan impl for training / prefill.
    chunk: int = 8                 # steps per chunk of scan="chunked" and "analytic"
    dt_min: float = 0.001
    dt_max: float = 0.1

    def __post_init__(self):
        _check_common("mamba", self.d_state, self.d_conv, self.expand)
        if self.scan not in SCAN_IMPLS:
            raise UserError(f"model.mamba.scan={self.scan!r} is not one of "
                            f"{', '.join(SCAN_IMPLS)}")
        check_chunk(self.chunk, "model.mamba.chunk")


class Mamba(nn.Module):
    cfg: object
    opts: MambaOptions
    Options = MambaOptions
    slot_name = "mamba"

    @classmethod
    def from_config(cls, cfg, options, *, name, causal=True, deterministic=True):
        if not causal:
            raise UserError("model.mixer='mamba' is causal only")
        return cls(cfg, options, name=name)

    @classmethod
    def init_cache(cls, cfg, options, batch_size, length, dtype):
        e = options.expand * cfg.d_model
        return {"conv": jnp.zeros((batch_size, options.d_conv - 1, e), dtype),
                "ssm": jnp.zeros((batch_size, e, options.d_state), jnp.float32)}

    @nn.compact
    def __call__(self, x_BxTxD, *, positions_T=None, kv_valid=None, cache=None,
                 cache_index=None):
        c, o = self.cfg, self.opts
        b, _, d = x_BxTxD.shape
        e, n = o.expand * d, o.d_state
        rank = o.dt_rank or math.ceil(d / 16)
        xz = _dense(2 * e, ("embed", "mlp"), "in_proj", c)(x_BxTxD)
        x_BxTxE, z_BxTxE = jnp.split(xz, 2, axis=-1)
        kernel = self.param("conv_kernel", partitioned(
            nn.initializers.normal(1.0 / o.d_conv), (None, "mlp")), (o.d_conv, e))
        bias = self.param("conv_bias", partitioned(nn.initializers.zeros, ("mlp",)), (e,))
        tail = (jnp.zeros((b, o.d_conv - 1, e), x_BxTxE.dtype) if cache is None
                else cache["conv"])
        x_BxTxE, new_tail = causal_depthwise_conv(x_BxTxE, kernel, bias, tail)
        x_BxTxE = nn.silu(x_BxTxE)
        dbc = _dense(rank + 2 * n, ("mlp", None), "x_proj", c)(x_BxTxE)
        dt_BxTxR, B_BxTxN, C_BxTxN = jnp.split(dbc, [rank, rank + n], axis=-1)
        dt_BxTxE = _dense(e, (None, "mlp"), "dt_proj", c)(dt_BxTxR)
        dt_bias = self.param("dt_bias", partitioned(_dt_bias_init(o.dt_min, o.dt_max),
                                                    ("mlp",)), (e,))
        a_log = self.param("A_log", partitioned(lambda k, s: jnp.log(jnp.broadcast_to(
            jnp.arange(1, s[1] + 1, dtype=jnp.float32), s)), ("mlp", None)), (e, n))
        d_skip = self.param("D", partitioned(nn.initializers.ones, ("mlp",)), (e,))
        y, last = selective_scan(
            x_BxTxE, dt_BxTxE, -jnp.exp(a_log), B_BxTxN, C_BxTxN, d_skip, z_BxTxE,
            delta_bias=dt_bias, delta_softplus=True, return_last_state=True,
            impl=o.scan, chunk=o.chunk, initial_state=None if cache is None else cache["ssm"])
        out = _dense(d, ("mlp", "embed"), "out_proj", c)(y)
        new = None if cache is None else {"conv": new_tail.astype(cache["conv"].dtype),
                                          "ssm": last}
        return out, new


# ---------------------------------------------------------------------------------------
# Mamba-2.

@dataclasses.dataclass(frozen=True)
class Mamba2Options:
    d_state: int = 32
    d_conv: int = 4
    expand: int = 2
    head_dim: int = 32             # P; heads = expand * d_model / head_dim.
    n_groups: int = 1              # B, C shared by heads / n_groups heads.
    chunk: int = 16
    dt_min: float = 0.001
    dt_max: float = 0.1

    def __post_init__(self):
        _check_common("mamba2", self.d_state, self.d_conv, self.expand)
        check_chunk(self.chunk, "model.mamba2.chunk")
        if self.head_dim < 1 or self.n_groups < 1:
            raise UserError("model.mamba2.head_dim and n_groups must be >= 1")


class Mamba2(nn.Module):
    cfg: object
    opts: Mamba2Options
    Options = Mamba2Options
    slot_name = "mamba2"

    @classmethod
    def from_config(cls, cfg, options, *, name, causal=True, deterministic=True):
        if not causal:
            raise UserError("model.mixer='mamba2' is causal only")
        e = options.expand * cfg.d_model
        if e % options.head_dim or (e // options.head_dim) % options.n_groups:
            raise UserError(f"model.mamba2: expand * d_model = {e} must split into heads of "
                            f"head_dim={options.head_dim}, a multiple of n_groups="
                            f"{options.n_groups}")
        return cls(cfg, options, name=name)

    @classmethod
    def init_cache(cls, cfg, options, batch_size, length, dtype):
        o = options
        e = o.expand * cfg.d_model
        conv_dim = e + 2 * o.n_groups * o.d_state
        return {"conv": jnp.zeros((batch_size, o.d_conv - 1, conv_dim), dtype),
                "ssm": jnp.zeros((batch_size, e // o.head_dim, o.head_dim, o.d_state),
                                 jnp.float32)}

    @nn.compact
    def __call__(self, x_BxTxD, *, positions_T=None, kv_valid=None, cache=None,
                 cache_index=None):
        c, o = self.cfg, self.opts
        b, t, d = x_BxTxD.shape
        e, n, g = o.expand * d, o.d_state, o.n_groups
        h = e // o.head_dim
        conv_dim = e + 2 * g * n
        zxbcdt = _dense(e + conv_dim + h, ("embed", "mlp"), "in_proj", c)(x_BxTxD)
        z_BxTxE, xbc, dt_BxTxH = jnp.split(zxbcdt, [e, e + conv_dim], axis=-1)
        kernel = self.param("conv_kernel", partitioned(
            nn.initializers.normal(1.0 / o.d_conv), (None, "mlp")), (o.d_conv, conv_dim))
        bias = self.param("conv_bias", partitioned(nn.initializers.zeros, ("mlp",)),
                          (conv_dim,))
        tail = (jnp.zeros((b, o.d_conv - 1, conv_dim), xbc.dtype) if cache is None
                else cache["conv"])
        xbc, new_tail = causal_depthwise_conv(xbc, kernel, bias, tail)
        xbc = nn.silu(xbc)
        x_BxTxE, B, C = jnp.split(xbc, [e, e + g * n], axis=-1)
        dt_bias = self.param("dt_bias", _dt_bias_init(o.dt_min, o.dt_max), (h,))
        a_log = self.param("A_log", lambda k, s: jnp.log(
            jax.random.uniform(k, s, jnp.float32, 1.0, 16.0)), (h,))
        d_skip = self.param("D", nn.initializers.ones, (h,))
        dt = jax.nn.softplus(dt_BxTxH.astype(jnp.float32) + dt_bias)
        x_BxTxHxP = x_BxTxE.astype(jnp.float32).reshape(b, t, h, o.head_dim)
        chunk = min(o.chunk, 1 << max(t - 1, 0).bit_length())  # decode steps: chunk 1
        y, last = ssd(x_BxTxHxP * dt[..., None], -jnp.exp(a_log) * dt,
                      B.reshape(b, t, g, n), C.reshape(b, t, g, n), chunk,
                      initial_states=None if cache is None else cache["ssm"])
        y = (y + d_skip[:, None] * x_BxTxHxP).reshape(b, t, e)
        scale = self.param("norm_scale", partitioned(nn.initializers.ones, ("mlp",)), (e,))
        y = rms_norm(y * jax.nn.silu(z_BxTxE.astype(jnp.float32)), scale, 1e-6)
        out = _dense(d, ("mlp", "embed"), "out_proj", c)(y.astype(x_BxTxD.dtype))
        new = None if cache is None else {"conv": new_tail.astype(cache["conv"].dtype),
                                          "ssm": last}
        return out, new
