"""Gradient debugging on a planted bug: find where a NaN is born.

The bug: cross-entropy through an explicit softmax, exp(z) / sum(exp(z)).
When the model is confidently *right* (a logit of 200 on the true class),
exp(200) overflows float32 to inf and inf / inf = NaN: the loss is NaN
exactly when the prediction is best. Three JAX tools catch it:

  * jax.debug.print   prints traced intermediates from inside jit;
  * jax.debug_nans    re-runs a jitted function op by op when its output holds
                      a NaN, and raises at the primitive that made it;
  * checkify          functionalizes the check (works under jit/vmap/grad) and
                      returns an error value naming the primitive and its line.
The fix is to never form exp(z) unshifted: log_softmax (logsumexp, lse.py).
"""

from __future__ import annotations

import contextlib
import io
import os
import traceback

import jax
import jax.numpy as jnp
from jax.experimental import checkify

_JAX_DIR = os.path.dirname(jax.__file__)


def buggy_cross_entropy(logits_BxC: jax.Array, labels_B: jax.Array) -> jax.Array:
    """The planted bug (do not copy): an unshifted softmax."""
    probs_BxC = jnp.exp(logits_BxC) / jnp.sum(jnp.exp(logits_BxC), axis=-1, keepdims=True)
    return -jnp.mean(jnp.log(jnp.take_along_axis(probs_BxC, labels_B[:, None], axis=-1)))


def fixed_cross_entropy(logits_BxC: jax.Array, labels_B: jax.Array) -> jax.Array:
    """The fix: log_softmax = z - logsumexp(z), computed with the max shifted out."""
    logp_BxC = jax.nn.log_softmax(logits_BxC, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp_BxC, labels_B[:, None], axis=-1))


def planted_batch() -> tuple[jax.Array, jax.Array]:
    """Two examples; the second is a confident, correct prediction (logit 200)."""
    logits = jnp.array([[1.0, 2.0, 0.5], [0.0, 200.0, 1.0]])
    return logits, jnp.array([1, 1])


def user_location(frames: list[tuple[str, int]]) -> str:
    """'file.py:line' of the innermost frame outside jax itself, '' if none."""
    for filename, line in reversed(frames):
        if not filename.startswith(_JAX_DIR):
            return f"{os.path.basename(filename)}:{line}"
    return ""


def debug_print_trace(logits_BxC, labels_B) -> str:
    """Print per-example sum(exp(z)) from inside jit and return what was printed."""

    @jax.jit
    def traced(z, y):
        jax.debug.print("sum(exp(logits)) per example = {s}", s=jnp.sum(jnp.exp(z), axis=-1))
        return buggy_cross_entropy(z, y)

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        jax.block_until_ready(traced(logits_BxC, labels_B))
        jax.effects_barrier()  # debug callbacks are asynchronous: wait for the print
    return buffer.getvalue().strip()


def catch_with_debug_nans(fn, *args) -> tuple[str, str]:
    """Run jit(fn) under jax.debug_nans; return (error message, user line) or ('', '')."""
    try:  # jax prints "Invalid nan value encountered ... de-optimized version" (stdout) on
        # the way to the error: expected here, so it stays out of the chapter's output.
        with jax.debug_nans(True), contextlib.redirect_stdout(io.StringIO()):
            jax.block_until_ready(jax.jit(fn)(*args))
    except FloatingPointError as e:
        frames = [(f.filename, f.lineno) for f in traceback.extract_tb(e.__traceback__)]
        return str(e).splitlines()[0], user_location(frames)
    return "", ""


def catch_with_checkify(fn, *args) -> tuple[str, str]:
    """jit(checkify(fn)) with NaN and division checks; return (message, user line)."""
    checked = jax.jit(checkify.checkify(fn, errors=checkify.float_checks))
    err, _ = checked(*args)
    exc = err.get_exception()
    if exc is None:
        return "", ""
    tb = exc.traceback_info.as_python_traceback()
    frames = [(f.filename, f.lineno) for f in traceback.extract_tb(tb)]
    return str(exc), user_location(frames)


def run_debugging_lab() -> dict:
    """Catch and locate the planted NaN with each tool, then verify the fix."""
    logits, labels = planted_batch()
    nan_msg, nan_where = catch_with_debug_nans(buggy_cross_entropy, logits, labels)
    ck_msg, ck_where = catch_with_checkify(buggy_cross_entropy, logits, labels)
    ck_grad_msg, ck_grad_where = catch_with_checkify(jax.grad(buggy_cross_entropy), logits, labels)
    return {
        "debug_print": debug_print_trace(logits, labels),
        "debug_nans_message": nan_msg,
        "debug_nans_location": nan_where,
        "checkify_message": ck_msg,
        "checkify_location": ck_where,
        "checkify_grad_message": ck_grad_msg,
        "checkify_grad_location": ck_grad_where,
        **{k: float(v) for k, v in _bug_and_fix(logits, labels).items()},
    }


@jax.jit
def _bug_and_fix(logits_BxC, labels_B) -> dict:
    """The symptoms of the bug and the fix, in one compiled call."""
    fixed_grad = jax.grad(fixed_cross_entropy)(logits_BxC, labels_B)
    small = logits_BxC.at[1, 1].set(3.0)  # where the bug does not bite, both must agree
    return {
        "buggy_loss_is_nan": jnp.isnan(buggy_cross_entropy(logits_BxC, labels_B)),
        "buggy_grad_has_nan": jnp.any(jnp.isnan(jax.grad(buggy_cross_entropy)(logits_BxC, labels_B))),
        "fixed_loss": fixed_cross_entropy(logits_BxC, labels_B),
        "fixed_grad_finite": jnp.all(jnp.isfinite(fixed_grad)),
        "fixed_vs_buggy_small_logits": jnp.abs(
            fixed_cross_entropy(small, labels_B) - buggy_cross_entropy(small, labels_B)),
    }
