"""Gradient checking: compare an analytic gradient with central differences.

    df/dx_i ~ (f(x + eps e_i) - f(x - eps e_i)) / (2 eps)      error O(eps^2)

Run in float64: in float32 the rounding error of f, about 1e-7 |f| / eps,
swamps the O(eps^2) truncation error for any useful eps, so a correct
gradient would look wrong by ~1e-3. In float64 a correct gradient agrees to
~1e-8 relative error and a buggy one stands out by orders of magnitude.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np


def numerical_grad(f: Callable[[np.ndarray], float], x: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    """Central-difference gradient of a scalar function of one float64 array."""
    x = np.array(x, dtype=np.float64)
    g = np.zeros_like(x)
    flat_x, flat_g = x.reshape(-1), g.reshape(-1)  # views: writes land in x and g
    for i in range(flat_x.size):
        orig = flat_x[i]
        flat_x[i] = orig + eps
        f_plus = float(f(x))
        flat_x[i] = orig - eps
        f_minus = float(f(x))
        flat_x[i] = orig
        flat_g[i] = (f_plus - f_minus) / (2 * eps)
    return g


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| / max(|a|, |b|, tiny): scale-free, and 0 when both are 0."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = max(np.max(np.abs(a)), np.max(np.abs(b)), 1e-12)
    return float(np.max(np.abs(a - b)) / scale)


def check_grad(f: Callable[[jax.Array], jax.Array], x: np.ndarray, eps: float = 1e-5,
               grad_fn: Callable[[jax.Array], jax.Array] | None = None) -> float:
    """Relative error between an analytic gradient and central differences, in float64.

    The analytic gradient is `grad_fn(x)` (e.g. hand-written backprop), by default
    `jax.grad(f)`. Both must be written with jnp so they trace at float64.
    """
    with jax.enable_x64(True):
        x64 = jnp.asarray(x, dtype=jnp.float64)
        analytic = np.asarray(jax.jit(grad_fn or jax.grad(f))(x64))
        f_jit = jax.jit(f)  # the n-evaluation loop is dispatch-bound: compile once
        numeric = numerical_grad(lambda v: f_jit(jnp.asarray(v)), np.asarray(x64), eps)
    return relative_error(analytic, numeric)


# ---- a planted bug for gradcheck to find ----
@jax.custom_vjp
def softplus_buggy_grad(x: jax.Array) -> jax.Array:
    """softplus(x) = log(1 + e^x) whose hand-written VJP forgets a factor.

    The correct derivative is sigmoid(x); the planted bug returns
    sigmoid(x) * (1 - sigmoid(x)) (the derivative of sigmoid, a classic mix-up).
    Forward values are right, so only a gradient check can catch it.
    """
    return jnp.logaddexp(0.0, x)


def _softplus_fwd(x):
    return jnp.logaddexp(0.0, x), jax.nn.sigmoid(x)


def _softplus_bwd(s, g):
    return (g * s * (1 - s),)  # BUG (on purpose): should be g * s


softplus_buggy_grad.defvjp(_softplus_fwd, _softplus_bwd)
