"""Noise schedules, the forward process q(x_t | x_0), and what the network predicts.

Notation of Ho et al. 2020: beta_t is the noise added at step t, alpha_bar_t = prod(1 - beta)
is the fraction of signal variance left, and the forward marginal is

    q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I)          (DDPM eq. 4)

The network output is eps (the noise, DDPM) or v = sqrt(abar) eps - sqrt(1 - abar) x_0
(Salimans & Ho 2022, section 4); both convert to a pair (x_0 estimate, eps estimate) given
x_t, which is all a sampler needs.
"""
from __future__ import annotations

import math

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxcourse.errors import UserError

SCHEDULES = ("linear", "cosine")
PREDICTIONS = ("eps", "v")


@flax.struct.dataclass
class Schedule:
    betas: jax.Array        # [T]
    alpha_bars: jax.Array   # [T], decreasing from about 1 to about 0.

    @property
    def steps(self) -> int:
        return self.betas.shape[0]


def make_schedule(kind: str, steps: int) -> Schedule:
    """`linear`: DDPM's 1e-4..0.02 (rescaled to `steps`); `cosine`: Nichol & Dhariwal 2021 eq. 17."""
    if steps < 2:
        raise UserError(f"diffusion.steps must be >= 2, got {steps}")
    if kind == "linear":
        scale = 1000.0 / steps  # keeps alpha_bar_T near DDPM's value for any T.
        betas = np.linspace(1e-4 * scale, 0.02 * scale, steps, dtype=np.float64)
    elif kind == "cosine":
        s = 0.008
        f = np.cos((np.arange(steps + 1, dtype=np.float64) / steps + s) / (1 + s) * math.pi / 2) ** 2
        betas = np.clip(1.0 - f[1:] / f[:-1], 0.0, 0.999)  # clipped: no singularity at t=T.
    else:
        raise UserError(f"diffusion.schedule={kind!r} is not one of {', '.join(SCHEDULES)}")
    alpha_bars = np.cumprod(1.0 - betas)
    return Schedule(betas=jnp.asarray(betas, jnp.float32),
                    alpha_bars=jnp.asarray(alpha_bars, jnp.float32))


def _bcast(coef_B, x):
    """Per-example coefficient [B] (or scalar) shaped to broadcast against x [B, ...]."""
    coef_B = jnp.asarray(coef_B, x.dtype)
    return coef_B.reshape(coef_B.shape + (1,) * (x.ndim - coef_B.ndim))


def q_sample(sched: Schedule, x0, t_B, noise):
    """A draw of x_t ~ q(x_t | x_0) for integer timesteps t (DDPM eq. 4)."""
    abar = sched.alpha_bars[t_B]
    return _bcast(jnp.sqrt(abar), x0) * x0 + _bcast(jnp.sqrt(1.0 - abar), x0) * noise


def training_target(x0, noise, abar_B, prediction: str):
    """What the network is regressed onto: the noise, or the velocity v."""
    if prediction == "eps":
        return noise
    if prediction == "v":
        return _bcast(jnp.sqrt(abar_B), x0) * noise - _bcast(jnp.sqrt(1.0 - abar_B), x0) * x0
    raise UserError(f"diffusion.prediction={prediction!r} is not one of {', '.join(PREDICTIONS)}")


def split_output(x_t, out, abar, prediction: str, clip_x0: float = 0.0):
    """(x_0 estimate, eps estimate) from the network output at noise level alpha_bar.

    With clip_x0 > 0 the x_0 estimate is clipped to [-clip_x0, clip_x0] (pixels live in
    [-1, 1]) and eps is recomputed from the clipped x_0, so both stay consistent with x_t.
    """
    a, s = _bcast(jnp.sqrt(abar), x_t), _bcast(jnp.sqrt(1.0 - abar), x_t)
    if prediction == "eps":
        eps, x0 = out, (x_t - s * out) / a
    elif prediction == "v":
        x0, eps = a * x_t - s * out, s * x_t + a * out
    else:
        raise UserError(f"diffusion.prediction={prediction!r} is not one of "
                        f"{', '.join(PREDICTIONS)}")
    if clip_x0 > 0:
        x0 = jnp.clip(x0, -clip_x0, clip_x0)
        eps = (x_t - a * x0) / s
    return x0, eps
