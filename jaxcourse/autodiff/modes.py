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


def make_layer(n: int, m: int, seed: int = 0):
    """f(x) = tanh(W x) * sum(x^2) with W of shape (m, n): a smooth R^n -> R^m map."""
    w_MxN = jax.random.normal(jax.random.key(seed), (m, n)) / np.sqrt(n)

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


def _flops(fn, x) -> float:
    """XLA's own FLOP estimate for the compiled function (deterministic, unlike timing)."""
    analysis = jax.jit(fn).lower(x).compile().cost_analysis()
    if isinstance(analysis, list):  # older jax returned one dict per device
        analysis = analysis[0]
    return float(analysis.get("flops", float("nan"))) if analysis else float("nan")


def compare_jacobians(n: int, m: int, repeats: int = 20, seed: int = 0) -> dict:
    """Build J of an R^n -> R^m map both ways; check they agree; cost each."""
    f = make_layer(n, m, seed)
    x = jax.random.normal(jax.random.key(seed + 1), (n,))
    fwd, rev = jax.jit(jax.jacfwd(f)), jax.jit(jax.jacrev(f))
    j_fwd, j_rev = fwd(x), rev(x)
    return {
        "max_abs_diff_fwd_rev": float(jnp.max(jnp.abs(j_fwd - j_rev))),
        "max_abs_diff_jvp_cols": float(jnp.max(jnp.abs(jacobian_from_jvps(f, x) - j_fwd))),
        "max_abs_diff_vjp_rows": float(jnp.max(jnp.abs(jacobian_from_vjps(f, x) - j_rev))),
        "jacfwd_ms": 1e3 * _time(fwd, x, repeats),
        "jacrev_ms": 1e3 * _time(rev, x, repeats),
        "jacfwd_flops": _flops(jax.jacfwd(f), x),
        "jacrev_flops": _flops(jax.jacrev(f), x),
    }
