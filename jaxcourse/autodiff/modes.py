"""Forward mode vs reverse mode, and when each Jacobian is cheaper.

For f: R^n -> R^m,
  * a JVP  (jax.jvp) pushes one tangent forward: one column J v, cost ~ f.
  * a VJP  (jax.vjp) pulls one cotangent back:  one row  u^T J, cost ~ f
    (plus memory for the forward's residuals).
  * jacfwd builds J from n JVPs, jacrev from m VJPs (both vmapped).
So jacfwd wins for "tall" f (n << m) and jacrev for "wide" f (n >> m);
a loss (m = 1) is the extreme wide case, which is why training uses reverse mode.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np


def layer_weights(n: int, m: int, seed: int = 0) -> np.ndarray:
    """W (m, n) of `make_layer`, variance 1/n so tanh(W x) stays in its linear range."""
    return np.random.default_rng(seed).normal(size=(m, n)).astype(np.float32) / np.sqrt(n)


def make_layer(n: int, m: int, seed: int = 0):
    """f(x) = tanh(W x) * sum(x^2) with W of shape (m, n): a smooth R^n -> R^m map."""
    w_MxN = layer_weights(n, m, seed)

    def f(x_N):
        return jnp.tanh(jnp.einsum("mn,n->m", w_MxN, x_N)) * jnp.sum(x_N**2)

    return f


def jacobian_from_jvps(f, x):
    """Column by column: J[:, i] = jvp(f, x, e_i). n forward passes."""
    basis = jnp.eye(x.shape[0], dtype=x.dtype)
    cols = jax.vmap(lambda e: jax.jvp(f, (x,), (e,))[1])(basis)  # (n, m)
    return cols.T


def jacobian_from_vjps(f, x):
    """Row by row: J[j, :] = vjp(f, x)(e_j). One forward pass, m backward passes."""
    y, pullback = jax.vjp(f, x)
    basis = jnp.eye(y.shape[0], dtype=y.dtype)
    return jax.vmap(lambda e: pullback(e)[0])(basis)  # (m, n)


def _time(fn, x, repeats: int) -> float:
    """Median seconds per call of a compiled function (after a warm-up call)."""
    jax.block_until_ready(fn(x))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(x))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def _flops(compiled) -> float:
    """XLA's own FLOP estimate for a compiled function (deterministic, unlike timing)."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list):  # older jax returned one dict per device
        analysis = analysis[0]
    return float(analysis.get("flops", float("nan"))) if analysis else float("nan")


def compare_jacobians(n: int, m: int, repeats: int = 20, seed: int = 0) -> dict:
    """Build J of an R^n -> R^m map both ways; check they agree; cost each."""
    f = make_layer(n, m, seed)
    x = jnp.asarray(np.random.default_rng(seed + 1).normal(size=n), jnp.float32)
    fwd = jax.jit(jax.jacfwd(f)).lower(x).compile()  # compile once: time and count the same code
    rev = jax.jit(jax.jacrev(f)).lower(x).compile()
    diffs = jax.jit(lambda x, j_fwd, j_rev: {
        "max_abs_diff_fwd_rev": jnp.max(jnp.abs(j_fwd - j_rev)),
        "max_abs_diff_jvp_cols": jnp.max(jnp.abs(jacobian_from_jvps(f, x) - j_fwd)),
        "max_abs_diff_vjp_rows": jnp.max(jnp.abs(jacobian_from_vjps(f, x) - j_rev)),
    })(x, fwd(x), rev(x))
    return {
        **{k: float(v) for k, v in diffs.items()},
        "jacfwd_ms": 1e3 * _time(fwd, x, repeats),
        "jacrev_ms": 1e3 * _time(rev, x, repeats),
        "jacfwd_flops": _flops(fwd),
        "jacrev_flops": _flops(rev),
    }
