"""Samplers: DDPM ancestral, DDIM (any steps, any eta), and a probability-flow ODE solver.

Every sampler walks a decreasing subsequence tau of the T training timesteps (a `plan`)
inside one `lax.fori_loop`, so a whole run is one compiled loop; the plan is an input, so
one compiled sampler serves every step count. `model_fn(x_t, t_B) -> output` is the
(possibly guided) network; `prediction` says whether it outputs eps or v.

- DDPM (Ho et al. 2020, eq. 6-7), respaced to S steps as in Nichol & Dhariwal 2021 sec. 4:
  beta'_i = 1 - abar_{tau_i} / abar_{tau_{i-1}}, then the exact Gaussian posterior
  q(x_{tau_{i-1}} | x_{tau_i}, x_0) with x_0 replaced by the network's estimate.
- DDIM (Song, Meng & Ermon 2021, eq. 12): deterministic for eta=0; eta=1 has the DDPM
  posterior variance, so with the same noise it reproduces the DDPM sampler exactly.
- Probability-flow ODE (Song et al. 2021, eq. 13): for the VP SDE the ODE reads, in the
  coordinates y = x / sqrt(abar) and sigma = sqrt((1 - abar) / abar),
      dy / dsigma = eps_theta(x, t)                       (Karras et al. 2022, eq. 4, VP row)
  DDIM with eta=0 is Euler's method on it; `ode_sample` uses Heun's second-order method
  (Karras et al. 2022, Algorithm 1), with Euler steps out of pure noise and into sigma=0.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxcourse.diffusion.schedules import Schedule, split_output
from jaxcourse.errors import UserError

SAMPLERS = ("ddpm", "ddim", "ode")
ModelFn = Callable[[jax.Array, jax.Array], jax.Array]


def timesteps(total: int, steps: int) -> np.ndarray:
    """`steps` timesteps from T-1 down to 0, evenly spaced ("trailing": T-1 always included,
    Lin et al. 2024 sec. 3.3, so the first step starts from pure noise)."""
    if not 1 <= steps <= total:
        raise UserError(f"sampling steps must be in [1, {total}], got {steps}")
    return np.unique(np.round(np.linspace(0, total - 1, steps)).astype(np.int32))[::-1].copy()


def plan(sched: Schedule, steps: int, length: int | None = None) -> dict:
    """The arrays a sampler walks: t, abar_t and abar_prev per step (abar_prev = 1 after the
    last step, which lands on x_0). Padded to `length` (default T) so that one compiled
    sampler serves every step count; `n` says how many entries are real."""
    tau = timesteps(sched.steps, steps)
    length = length or sched.steps
    pad = length - len(tau)
    abar = np.asarray(sched.alpha_bars, np.float64)[tau]
    abar_prev = np.concatenate([abar[1:], [1.0]])
    t_prev = np.concatenate([tau[1:], [0]])
    # beta of the respaced chain, in float64: 1 - abar/abar_prev cancels badly in float32.
    beta = 1.0 - abar / abar_prev
    f32 = lambda v, fill: jnp.asarray(np.pad(v, (0, pad), constant_values=fill), jnp.float32)
    return {"t": jnp.asarray(np.pad(tau, (0, pad)), jnp.int32),
            "t_prev": jnp.asarray(np.pad(t_prev, (0, pad)), jnp.int32),
            "abar": f32(abar, 0.5), "abar_prev": f32(abar_prev, 1.0), "beta": f32(beta, 0.5),
            "n": jnp.asarray(len(tau), jnp.int32)}


def _walk(step_fn, p: dict, x):
    """Runs step_fn(i, x, t, t_prev, abar, abar_prev, beta) for the p["n"] real entries of a plan."""
    def body(i, x):
        return step_fn(i, x, p["t"][i], p["t_prev"][i], p["abar"][i], p["abar_prev"][i],
                       p["beta"][i])
    return jax.lax.fori_loop(0, p["n"], body, x)


def _t_batch(t, x):
    return jnp.full((x.shape[0],), t, jnp.int32)


def ddpm_sample(model_fn: ModelFn, p: dict, rng, x_T, prediction: str = "eps",
                clip_x0: float = 0.0):
    """Ancestral sampling with the posterior variance beta-tilde (DDPM sec. 3.2)."""

    def step(i, x, t, _, a, a_prev, beta):
        x0, _ = split_output(x, model_fn(x, _t_batch(t, x)), a, prediction, clip_x0)
        # Posterior mean and variance of q(x_prev | x_t, x_0) (DDPM eq. 7).
        coef_x0 = jnp.sqrt(a_prev) * beta / (1.0 - a)
        coef_xt = jnp.sqrt(1.0 - beta) * (1.0 - a_prev) / (1.0 - a)
        var = beta * (1.0 - a_prev) / (1.0 - a)
        noise = jax.random.normal(jax.random.fold_in(rng, i), x.shape)
        return coef_x0 * x0 + coef_xt * x + jnp.sqrt(var) * noise

    return _walk(step, p, x_T)


def ddim_sample(model_fn: ModelFn, p: dict, rng, x_T, eta=0.0, prediction: str = "eps",
                clip_x0: float = 0.0):
    """DDIM update (eq. 12): predicted x_0, direction to x_t, and eta-scaled fresh noise."""

    def step(i, x, t, _, a, a_prev, beta):
        x0, eps = split_output(x, model_fn(x, _t_batch(t, x)), a, prediction, clip_x0)
        sigma = eta * jnp.sqrt((1.0 - a_prev) / (1.0 - a) * beta)  # 1 - a/a_prev = beta.
        direction = jnp.sqrt(jnp.maximum(1.0 - a_prev - sigma ** 2, 0.0)) * eps
        noise = jax.random.normal(jax.random.fold_in(rng, i), x.shape)
        return jnp.sqrt(a_prev) * x0 + direction + sigma * noise

    return _walk(step, p, x_T)


def ode_sample(model_fn: ModelFn, p: dict, rng, x_T, prediction: str = "eps",
               clip_x0: float = 0.0):
    """Heun's method on the probability-flow ODE dy/dsigma = eps (2 evaluations per step)."""
    del rng  # deterministic.

    def step(i, x, t, t_next, a, a_next, _):
        x0, eps = split_output(x, model_fn(x, _t_batch(t, x)), a, prediction, clip_x0)
        x_euler = jnp.sqrt(a_next) * x0 + jnp.sqrt(1.0 - a_next) * eps  # = DDIM, eta=0.

        def heun(_):
            _, eps_next = split_output(x_euler, model_fn(x_euler, _t_batch(t_next, x)), a_next,
                                       prediction, clip_x0)
            # Trapezoid rule in (sigma, y) with y = x0 + sigma * eps:
            #   y_next = y + (sigma_next - sigma) * (eps + eps_next) / 2,
            # regrouped so that no huge sigma * eps terms cancel (sigma(T) is about 1e4).
            sig, sig_next = jnp.sqrt((1 - a) / a), jnp.sqrt((1 - a_next) / a_next)
            y_next = x0 + 0.5 * sig * (eps - eps_next) + 0.5 * sig_next * (eps + eps_next)
            return jnp.sqrt(a_next) * y_next

        # Two steps are Euler steps. The last lands on sigma = 0 (abar = 1), where the
        # corrector has no network evaluation to use (Karras et al., Algorithm 1). The first
        # leaves sigma(T-1), about 1e4 for the cosine schedule: over that span eps is
        # constant to ~1e-8 except in its last decade, so Euler is exact there, while the
        # trapezoid rule would give the endpoint value half the weight and overshoot.
        use_heun = (i > 0) & (a_next < 1.0)
        return jax.lax.cond(use_heun, heun, lambda _: x_euler, None)

    return _walk(step, p, x_T)


def sample(kind: str, model_fn: ModelFn, p: dict, rng, x_T, eta=0.0, prediction: str = "eps",
           clip_x0: float = 0.0):
    """Runs the sampler `kind` ("ddpm", "ddim" with `eta`, or "ode") along plan `p` from x_T."""
    if kind == "ddpm":
        return ddpm_sample(model_fn, p, rng, x_T, prediction, clip_x0)
    if kind == "ddim":
        return ddim_sample(model_fn, p, rng, x_T, eta, prediction, clip_x0)
    if kind == "ode":
        return ode_sample(model_fn, p, rng, x_T, prediction, clip_x0)
    raise UserError(f"sampler {kind!r} is not one of {', '.join(SAMPLERS)}")
