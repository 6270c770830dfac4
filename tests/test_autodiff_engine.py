"""The scalar (engine.py) and vectorized (tensor.py) engines against jax.grad."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcourse.autodiff import engine, tensor
from jaxcourse.autodiff.engine import Value
from jaxcourse.autodiff.tensor import Tensor

# (engine function, the same function in jnp), each of two scalars.
SCALAR_CASES = {
    "add_mul": (lambda a, b: a * b + a, lambda a, b: a * b + a),
    "sub_div": (lambda a, b: (a - b) / (b * b + 1.0), lambda a, b: (a - b) / (b * b + 1.0)),
    "rsub_rdiv": (lambda a, b: 2.0 - 3.0 / a + b, lambda a, b: 2.0 - 3.0 / a + b),
    "pow": (lambda a, b: a**3 + b**-2.0, lambda a, b: a**3 + b**-2.0),
    "exp_log": (lambda a, b: (a * b).exp() + (a * a + 1.0).log(),
                lambda a, b: jnp.exp(a * b) + jnp.log(a * a + 1.0)),
    "tanh_sigmoid": (lambda a, b: (a * b).tanh() * b.sigmoid(),
                     lambda a, b: jnp.tanh(a * b) * jax.nn.sigmoid(b)),
    "relu": (lambda a, b: (a - b).relu() * a + (b - a).relu(),
             lambda a, b: jax.nn.relu(a - b) * a + jax.nn.relu(b - a)),
}


@pytest.mark.parametrize("name", sorted(SCALAR_CASES))
def test_scalar_ops_match_jax_grad(name):
    f_engine, f_jax = SCALAR_CASES[name]
    with jax.enable_x64(True):
        for a, b in [(0.7, -1.3), (-0.4, 2.1)]:
            want = jax.grad(f_jax, argnums=(0, 1))(jnp.float64(a), jnp.float64(b))
            got = engine.grad(f_engine)(a, b)
            np.testing.assert_allclose(got, [float(w) for w in want], rtol=1e-12, atol=1e-12)
            assert f_engine(Value(a), Value(b)).data == pytest.approx(float(f_jax(a, b)), rel=1e-12)


def test_reused_node_accumulates_over_paths():
    # f = x*x + x uses x three times: df/dx = 2x + 1 sums the paths.
    x = Value(3.0)
    (x * x + x).backward()
    assert x.grad == 7.0
    # backward twice gives the same answer (grads are reset, not doubled).
    y = x * x
    y.backward()
    y.backward()
    assert x.grad == 6.0


def test_topological_order_puts_parents_first_and_handles_deep_graphs():
    x = Value(1.0)
    total = Value(0.0)
    for _ in range(5000):  # deeper than Python's default recursion limit
        total = total + x * 0.001
    order = engine.topological_order(total)
    position = {id(n): i for i, n in enumerate(order)}
    assert all(position[id(p)] < position[id(n)] for n in order for p in n.parents)
    total.backward()
    assert x.grad == pytest.approx(5.0, rel=1e-9)


def test_errors_are_clear():
    with pytest.raises(ValueError, match="non-positive"):
        Value(-1.0).log()
    with pytest.raises(TypeError, match="not supported"):
        Value(2.0) ** Value(3.0)


def test_scalar_mlp_matches_jax_grad_in_float32():
    rng = np.random.default_rng(0)
    shapes = [(3, 4), (4, 4), (4, 1)]
    params = [(rng.normal(size=s).astype(np.float32), rng.normal(size=s[1]).astype(np.float32))
              for s in shapes]
    xs = rng.normal(size=(5, 3)).astype(np.float32)
    ys = np.array([1.0, -1.0, 1.0, -1.0, 1.0], np.float32)

    layers = [(engine.to_values(w), engine.to_values(b)) for w, b in params]
    loss = sum(((engine.mlp_forward(engine.to_values(x), layers)[0] - y) ** 2 for x, y in zip(xs, ys)),
               Value(0.0)) / len(xs)
    loss.backward()

    def jax_loss(p):
        h = jnp.asarray(xs)
        for k, (w, b) in enumerate(p):
            h = h @ w + b
            h = jnp.tanh(h) if k < len(p) - 1 else h
        return jnp.mean((h[:, 0] - ys) ** 2)

    want = jax.grad(jax_loss)([(jnp.asarray(w), jnp.asarray(b)) for w, b in params])
    assert loss.data == pytest.approx(float(jax_loss(params)), rel=1e-5)
    for (w_v, b_v), (gw, gb) in zip(layers, want):
        np.testing.assert_allclose(engine.grads_of(w_v), gw, atol=1e-6)
        np.testing.assert_allclose(engine.grads_of(b_v), gb, atol=1e-6)


# ---------------- vectorized engine ----------------

def _tensor_vs_jax(f_tensor, f_jax, *arrays, dtype=np.float64, atol=1e-10):
    """Both engines in `dtype`; float64 isolates the math from rounding noise."""
    arrays = [np.asarray(a, dtype) for a in arrays]
    inputs = [Tensor(a) for a in arrays]
    out = f_tensor(*inputs)
    out.backward()
    with jax.enable_x64(dtype == np.float64):
        want = jax.jit(jax.grad(f_jax, argnums=tuple(range(len(arrays)))))(*map(jnp.asarray, arrays))
        np.testing.assert_allclose(out.data, f_jax(*arrays), rtol=1e-6, atol=atol)
    for t, w in zip(inputs, want):
        assert t.grad.shape == t.shape and t.grad.dtype == dtype
        np.testing.assert_allclose(t.grad, w, rtol=0, atol=atol)


def _rand(*shape, seed=0, positive=False):
    a = np.random.default_rng(seed + len(shape)).normal(size=shape).astype(np.float32)
    return np.abs(a) + 0.5 if positive else a


def test_tensor_broadcasting_binary_ops():
    a, b, c = _rand(3, 4), _rand(4, seed=1), _rand(3, 1, seed=2, positive=True)
    _tensor_vs_jax(lambda a, b, c: ((a + b) * c - b / c).sum(), lambda a, b, c: jnp.sum((a + b) * c - b / c),
                   a, b, c)
    _tensor_vs_jax(lambda a, c: (2.0 - a * 3.0 + 1.0 / c).mean(),
                   lambda a, c: jnp.mean(2.0 - a * 3.0 + 1.0 / c), a, c)


def test_tensor_matmul_reductions_and_shapes():
    a, b = _rand(3, 5), _rand(5, 2, seed=3)
    _tensor_vs_jax(lambda a, b: ((a @ b).tanh() ** 2).sum(axis=0).exp().sum(),
                   lambda a, b: jnp.sum(jnp.exp(jnp.sum(jnp.tanh(a @ b) ** 2, axis=0))), a, b)
    _tensor_vs_jax(lambda a: (a.T.reshape(15).relu() * a.reshape(15)).mean(),
                   lambda a: jnp.mean(jax.nn.relu(a.T.reshape(15)) * a.reshape(15)), a)
    _tensor_vs_jax(lambda a: a.max(axis=1).sum() + a.sum(axis=1, keepdims=True).mean(),
                   lambda a: jnp.sum(jnp.max(a, axis=1)) + jnp.mean(jnp.sum(a, axis=1, keepdims=True)), a)


def test_tensor_log_and_gather_scatter_with_repeated_index():
    a = _rand(4, 3, positive=True)
    idx = np.array([0, 2, 2, 1])
    _tensor_vs_jax(lambda a: a.log().take_along_last(idx).sum(),
                   lambda a: jnp.sum(jnp.log(a)[jnp.arange(4), idx]), a)


def test_tensor_cross_entropy_mlp_matches_jax_in_float32():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(16, 8)).astype(np.float32), rng.integers(0, 5, size=16)
    w1, w2 = _rand(8, 6, seed=4), _rand(6, 5, seed=5)
    b1, b2 = np.zeros(6, np.float32), np.zeros(5, np.float32)

    def f_tensor(w1, b1, w2, b2):
        return tensor.cross_entropy(((Tensor(x) @ w1 + b1).tanh()) @ w2 + b2, y)

    def f_jax(w1, b1, w2, b2):
        logits = jnp.tanh(x @ w1 + b1) @ w2 + b2
        return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - logits[jnp.arange(16), y])

    # The chapter's DONE-WHEN bound: max |engine - jax.grad| <= 1e-6 in float32.
    _tensor_vs_jax(f_tensor, f_jax, w1, b1, w2, b2, dtype=np.float32, atol=1e-6)


def test_tensor_logsumexp_is_stable():
    big = Tensor(np.array([[1000.0, 1000.0]], np.float32))
    out = tensor.logsumexp(big)
    out.sum().backward()
    assert out.data[0] == pytest.approx(1000.0 + math.log(2.0))
    np.testing.assert_allclose(big.grad, [[0.5, 0.5]])


def test_tensor_errors():
    with pytest.raises(ValueError, match="scalar output"):
        Tensor(np.ones(3)).backward()
    with pytest.raises(ValueError, match="2-D"):
        Tensor(np.ones(3)) @ Tensor(np.ones((3, 2)))
