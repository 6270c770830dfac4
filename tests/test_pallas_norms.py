"""rms_norm / layer_norm (interpret mode on CPU) against their jnp references, and the
references against flax's own layers. One jit of forward + backward per case."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk
from pallas_kernels.rms_norm import BlockSizes

# Relative to max(1, max|reference|): f32 differs only by summation order; the half types
# round the output and the gradients once (bf16 eps 7.8e-3, f16 eps 9.8e-4).
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1.6e-2, jnp.float16: 2e-3}

CASES = {
    # name: (x shape, dtype, block_rows); 21 rows in blocks of 4 and 48 -> 64 features pad
    "f32-rows-and-features-padded": ((3, 7, 48), jnp.float32, 4),
    "bf16-d100": ((10, 100), jnp.bfloat16, 4),
    "f16-default-blocks": ((5, 256), jnp.float16, 0),
}


def _inputs(shape, dtype):
    ks = jax.random.split(jax.random.key(0), 4)
    d = shape[-1]
    x = (2.0 * jax.random.normal(ks[0], shape) + 0.5).astype(dtype)   # non-zero mean
    w = (1.0 + 0.2 * jax.random.normal(ks[1], (d,))).astype(dtype)
    b = (0.2 * jax.random.normal(ks[2], (d,))).astype(dtype)
    dy = jax.random.normal(ks[3], shape).astype(dtype)
    return x, w, b, dy


def _value_and_grads(fn, dy, *args):
    out, vjp = jax.vjp(fn, *args)
    return (out,) + vjp(dy)


def _assert_close(got, want, dtype, what):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert got.shape == want.shape, what
    err = np.max(np.abs(got - want)) / max(1.0, np.max(np.abs(want)))
    assert err <= TOL[dtype], f"{what}: relative error {err:.2e} > {TOL[dtype]:.0e}"


@pytest.mark.parametrize("norm", ["rms", "layer"])
@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference(norm, name):
    shape, dtype, rows = CASES[name]
    x, w, b, dy = _inputs(shape, dtype)
    blocks = BlockSizes(block_rows=rows)
    if norm == "rms":
        args, names = (x, w), ("y", "dx", "dweight")
        kernel = lambda x, w: pk.rms_norm(x, w, interpret=True, block_sizes=blocks)
        reference = pk.rms_norm_reference
    else:
        args, names = (x, w, b), ("y", "dx", "dweight", "dbias")
        kernel = lambda x, w, b: pk.layer_norm(x, w, b, interpret=True, block_sizes=blocks)
        reference = pk.layer_norm_reference
    got = jax.jit(lambda dy, *a: _value_and_grads(kernel, dy, *a))(dy, *args)
    want = jax.jit(lambda dy, *a: _value_and_grads(reference, dy, *a))(dy, *args)
    for what, g, r in zip(names, got, want):
        _assert_close(g, r, dtype, f"{norm} {name} {what}")


def test_references_match_flax():
    x, w, b, _ = _inputs((4, 6, 32), jnp.float32)

    @jax.jit
    def both(x, w, b):
        rms = nn.RMSNorm(epsilon=1e-6).apply({"params": {"scale": w}}, x)
        ln = nn.LayerNorm(epsilon=1e-6).apply({"params": {"scale": w, "bias": b}}, x)
        return rms, ln, pk.rms_norm_reference(x, w), pk.layer_norm_reference(x, w, b)

    rms, ln, rms_ref, ln_ref = both(x, w, b)
    np.testing.assert_allclose(rms_ref, rms, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ln_ref, ln, rtol=1e-5, atol=1e-5)


def test_hand_computed_rms_norm():
    # rows [3, 4] and [1, 1]: rms = sqrt(12.5) and 1; weight [1, 2]
    x = jnp.array([[3.0, 4.0], [1.0, 1.0]])
    y = pk.rms_norm_reference(x, jnp.array([1.0, 2.0]), eps=0.0)
    r = np.sqrt(12.5)
    np.testing.assert_allclose(y, [[3 / r, 8 / r], [1.0, 2.0]], rtol=1e-6)


def test_empty_input_passes_through():
    x = jnp.zeros((0, 8))
    assert pk.rms_norm(x, jnp.ones(8)).shape == (0, 8)
    assert pk.layer_norm(x, jnp.ones(8), jnp.zeros(8)).shape == (0, 8)


@pytest.mark.parametrize("call, match", [
    (lambda: pk.rms_norm(jnp.ones((2, 8)), jnp.ones(7)), r"weight must have shape \(8,\)"),
    (lambda: pk.layer_norm(jnp.ones((2, 8)), jnp.ones(8), jnp.ones((1, 8))), "bias must have"),
    (lambda: pk.rms_norm(jnp.ones((2, 8), jnp.int32), jnp.ones(8)), "x has dtype int32"),
    (lambda: pk.rms_norm(jnp.float32(1.0), jnp.ones(8)), "x must have a feature axis"),
    (lambda: pk.layer_norm(jnp.ones((2, 8)), jnp.ones(8, jnp.int32), jnp.ones(8)),
     "weight has dtype int32"),
    (lambda: pk.rms_norm(jnp.ones((2, 8)), jnp.ones(8), block_sizes=BlockSizes(block_rows=3)),
     "block_rows must be a power of two"),
])
def test_bad_input_names_the_argument(call, match):
    with pytest.raises(pk.KernelInputError, match=match):
        call()
