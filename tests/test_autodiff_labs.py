"""lse, gradcheck, forward/reverse modes, hand-written MLP backprop, NaN debugging."""

import inspect
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcourse.autodiff import debugging, gradcheck, lse, mlp_backprop, modes


# ---------------- log-sum-exp ----------------

def test_naive_lse_overflows_where_stable_does_not():
    x = jnp.array([[1000.0, 1000.0], [-5.0, 3.0]])
    assert jnp.isinf(lse.logsumexp_naive(x)[0])
    out = lse.logsumexp_stable(x)
    np.testing.assert_allclose(out, [1000.0 + math.log(2.0), 3.0 + math.log1p(math.exp(-8.0))], rtol=1e-6)
    g = jax.grad(lambda v: lse.logsumexp_stable(v).sum())(x)
    np.testing.assert_allclose(g, jax.nn.softmax(x, axis=-1), atol=1e-7)
    assert jnp.all(jnp.isnan(jax.grad(lambda v: lse.logsumexp_naive(v).sum())(x)[0]))


def test_stable_lse_matches_reference_and_handles_all_neg_inf():
    x = jax.random.normal(jax.random.key(0), (4, 7)) * 10
    np.testing.assert_allclose(lse.logsumexp_stable(x), jax.nn.logsumexp(x, axis=-1), rtol=1e-6)
    np.testing.assert_allclose(lse.logsumexp_stable(x), lse.logsumexp_naive(x), rtol=1e-5)
    assert lse.logsumexp_stable(jnp.full((1, 3), -jnp.inf))[0] == -jnp.inf
    # jit + vmap compose with the custom VJP.
    g = jax.jit(jax.vmap(jax.grad(lambda row: lse.logsumexp_stable(row))))(x)
    np.testing.assert_allclose(g, jax.nn.softmax(x, axis=-1), atol=1e-6)


def test_stable_lse_passes_gradcheck():
    x = np.random.default_rng(0).normal(size=(3, 4))
    assert gradcheck.check_grad(lambda v: jnp.sum(lse.logsumexp_stable(v) ** 2), x) < 1e-8


# ---------------- gradient checking ----------------

def test_numerical_grad_matches_closed_form():
    x = np.array([0.3, -1.2, 2.0])
    g = gradcheck.numerical_grad(lambda v: np.sum(np.sin(v) * v**2), x)
    np.testing.assert_allclose(g, np.cos(x) * x**2 + 2 * x * np.sin(x), rtol=1e-8)
    np.testing.assert_array_equal(x, [0.3, -1.2, 2.0])  # input left untouched


def test_relative_error_is_scale_free():
    assert gradcheck.relative_error([1e6, 2e6], [1e6, 2e6 + 2]) == pytest.approx(1e-6)
    assert gradcheck.relative_error([0.0], [0.0]) == 0.0


def test_gradcheck_passes_jax_grad_and_catches_the_planted_bug():
    x = np.linspace(-2, 2, 5)
    assert gradcheck.check_grad(lambda v: jnp.sum(jax.nn.softplus(v) ** 2), x) < 1e-8
    bad = gradcheck.check_grad(lambda v: jnp.sum(gradcheck.softplus_buggy_grad(v)), x)
    assert bad > 0.1  # the bug is off by the factor (1 - sigmoid), far above noise
    # Forward values are right: only the gradient is wrong.
    np.testing.assert_allclose(gradcheck.softplus_buggy_grad(jnp.asarray(x)), jax.nn.softplus(x), rtol=1e-6)


# ---------------- forward vs reverse mode ----------------

def test_jacobian_constructions_agree_with_closed_form():
    f = modes.make_layer(n=5, m=3)
    x = jax.random.normal(jax.random.key(1), (5,))
    w = modes.layer_weights(5, 3)
    t, s = jnp.tanh(w @ x), jnp.sum(x**2)
    want = (1 - t**2)[:, None] * w * s + 2 * t[:, None] * x[None, :]  # product rule
    for j in (modes.jacobian_from_jvps(f, x), modes.jacobian_from_vjps(f, x), jax.jacrev(f)(x)):
        assert j.shape == (3, 5)
        np.testing.assert_allclose(j, want, atol=1e-6)


# ---------------- hand-written backprop ----------------

def test_mlp_backward_equals_jax_grad():
    params = mlp_backprop.init_params(jax.random.key(0), 8, 16, 5)
    x = jax.random.normal(jax.random.key(1), (32, 8))
    y = jax.random.randint(jax.random.key(2), (32,), 0, 5)
    value, grads = jax.jit(mlp_backprop.backward)(params, x, y)
    assert value == pytest.approx(float(jax.jit(mlp_backprop.loss)(params, x, y)), rel=1e-6)
    assert jax.tree.structure(grads) == jax.tree.structure(params)
    assert float(mlp_backprop.max_abs_diff_vs_jax(params, x, y)) <= 1e-6


def test_mlp_train_sgd_learns_a_separable_problem():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 4)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 0).astype(np.int32)
    params = mlp_backprop.init_params(jax.random.key(0), 4, 8, 2)
    acc0 = float(mlp_backprop.accuracy(params, x, y))
    params, losses = mlp_backprop.train_sgd(params, x, y, steps=200, batch_size=32, lr=0.5, seed=0)
    assert losses.shape == (200,)
    assert losses[-20:].mean() < 0.5 * losses[:20].mean()
    assert float(mlp_backprop.accuracy(params, x, y)) > max(acc0, 0.95)


# ---------------- NaN debugging ----------------

def test_planted_nan_is_located_by_checkify_and_fixed():
    logits, labels = debugging.planted_batch()
    msg, where = debugging.catch_with_checkify(debugging.buggy_cross_entropy, logits, labels)
    assert "nan" in msg and "div" in msg and where == bug_line()
    # Hand-computed: example 2 is certain (loss ~0); example 1 is log-softmax of [1, 2, 0.5] at 1.
    want = 0.5 * (math.log(math.exp(1) + math.exp(2) + math.exp(0.5)) - 2.0)
    assert float(debugging.fixed_cross_entropy(logits, labels)) == pytest.approx(want, rel=1e-5)


def test_checkify_reports_nothing_on_clean_input():
    logits, labels = debugging.planted_batch()
    assert debugging.catch_with_checkify(debugging.buggy_cross_entropy, logits * 0.01, labels) == ("", "")


def bug_line() -> str:
    """'debugging.py:N' of the planted division, found in the source (not hard-coded)."""
    lines = inspect.getsource(debugging).splitlines()
    n = next(i + 1 for i, line in enumerate(lines) if "probs_BxC = jnp.exp(logits_BxC) /" in line)
    return f"debugging.py:{n}"
