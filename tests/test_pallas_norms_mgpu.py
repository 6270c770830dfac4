"""rms_norm / layer_norm(impl="mosaic") in Mosaic GPU interpret mode vs their jnp references
(output, dx, dweight, dbias), the abstract-H100 lowering of both kernels, the impl switch with
its fallback, and bad input. Each case is one jit of forward + backward; shapes stay tiny
because the interpreter simulates the warpgroup, the TMA copies and the barriers."""
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk
from pallas_kernels import _common, _norm_rows_mgpu
from pallas_kernels.gpu_check import mosaic_gpu_kernels
from pallas_kernels.rms_norm import BlockSizes, MosaicBlockSizes

# Relative to max(1, max|reference|): f32 differs by summation order; the half types round the
# output and the gradients once.
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1.6e-2, jnp.float16: 2e-3}

CASES = {
    # name: (x shape, dtype, block_rows). 21 rows in blocks of 4 (the last block padded) and
    # D = 200 zero-padded to 256 (two 128-column chunks; LayerNorm corrects its variance).
    "f32-rows-and-features-padded": ((3, 7, 200), jnp.float32, 4),
    "bf16-default-blocks": ((10, 256), jnp.bfloat16, 0),
    "f16-d72-one-block": ((5, 72), jnp.float16, 8),
}


def _inputs(shape, dtype):
    rng = np.random.default_rng(0)      # numpy draws: no jax compile per shape
    d = shape[-1]

    def draw(s, scale=1.0, shift=0.0):
        return jnp.asarray(scale * rng.standard_normal(s, np.float32) + shift, dtype)
    return draw(shape, 2.0, 0.5), draw((d,), 0.2, 1.0), draw((d,), 0.2), draw(shape)


def _value_and_grads(fn, dy, *args):
    out, vjp = jax.vjp(fn, *args)
    return (out,) + vjp(dy)


@pytest.mark.parametrize("norm", ["rms", "layer"])
@pytest.mark.parametrize("name", list(CASES))
def test_mosaic_matches_reference(norm, name):
    shape, dtype, rows = CASES[name]
    x, w, b, dy = _inputs(shape, dtype)
    blocks = MosaicBlockSizes(block_rows=rows)
    if norm == "rms":
        args, names = (x, w), ("y", "dx", "dweight")
        kernel = lambda x, w: pk.rms_norm(x, w, impl="mosaic", block_sizes=blocks)
        reference = pk.rms_norm_reference
    else:
        args, names = (x, w, b), ("y", "dx", "dweight", "dbias")
        kernel = lambda x, w, b: pk.layer_norm(x, w, b, impl="mosaic", block_sizes=blocks)
        reference = pk.layer_norm_reference
    got = jax.jit(lambda dy, *a: _value_and_grads(kernel, dy, *a))(dy, *args)
    want = jax.jit(lambda dy, *a: _value_and_grads(reference, dy, *a))(dy, *args)
    for what, g, r in zip(names, got, want):
        g, r = np.asarray(g, np.float32), np.asarray(r, np.float32)
        assert g.shape == r.shape and np.all(np.isfinite(g)), f"{norm} {name} {what}"
        err = np.max(np.abs(g - r)) / max(1.0, np.max(np.abs(r)))
        assert err <= TOL[dtype], f"{norm} {name} {what}: relative error {err:.2e}"


def test_differentiation_runs_two_mosaic_kernels():
    x, w, b, _ = _inputs((4, 128), jnp.bfloat16)
    loss = lambda x, w, b: pk.layer_norm(x, w, b, impl="mosaic").astype(jnp.float32).sum()
    jaxpr = str(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(x, w, b))
    assert jaxpr.count("= mpmd_map[") == 2 and "pallas_call[" not in jaxpr


@pytest.mark.parametrize("d", [1024, 8192])
def test_lowers_for_h100(d):
    """Layout inference of the row reductions, TMA box / swizzle rules and the SMEM budget."""
    s = jax.ShapeDtypeStruct
    x, p = s((4096, d), jnp.bfloat16), s((d,), jnp.bfloat16)

    def step(x, w, b):
        rms = lambda x, w: pk.rms_norm(x, w, impl="mosaic", interpret=False)
        ln = lambda x, w, b: pk.layer_norm(x, w, b, impl="mosaic", interpret=False)
        # value_and_grad: with grad alone the forward kernels' output is dead and XLA drops it
        return (jax.value_and_grad(lambda x, w: rms(x, w).astype(jnp.float32).sum(),
                                   (0, 1))(x, w),
                jax.value_and_grad(lambda *a: ln(*a).astype(jnp.float32).sum(),
                                   (0, 1, 2))(x, w, b))
    modules = mosaic_gpu_kernels(step, x, p, p)
    assert len(modules) == 4 and min(modules) > 1000    # forward + backward, per norm


def test_widest_float32_layer_norm_fits_hopper_shared_memory():
    """The widest D that `unsupported` lets through (one row per CTA) lowers; the next falls back."""
    s = jax.ShapeDtypeStruct
    x, p = s((64, 11136), jnp.float32), s((11136,), jnp.float32)
    assert _norm_rows_mgpu.unsupported(x, [p, p], None) is None
    assert "shared memory" in _norm_rows_mgpu.unsupported(
        s((64, 11264), jnp.float32), [s((11264,), jnp.float32)] * 2, None)
    loss = lambda x, w, b: pk.layer_norm(x, w, b, impl="mosaic", interpret=False).sum()
    assert len(mosaic_gpu_kernels(jax.value_and_grad(loss, (0, 1, 2)), x, p, p)) == 2


def test_default_impl_off_gpu_is_triton():
    x = jax.ShapeDtypeStruct((4, 64), jnp.float32)
    assert _common.default_impl() == "triton"
    assert _norm_rows_mgpu.choose("rms_norm", None, None, x, [x]) == (False, None)


def test_too_wide_rows_fall_back(monkeypatch):
    """D = 20000 float32 does not fit one row's backward in SMEM: an explicit impl="mosaic"
    warns once; the default choice on a Hopper moves it to Triton silently."""
    x, w = jax.ShapeDtypeStruct((2, 20000), jnp.float32), jax.ShapeDtypeStruct((20000,),
                                                                              jnp.float32)
    with pytest.warns(UserWarning, match="impl='mosaic' does not support D=20000") as caught:
        assert _norm_rows_mgpu.choose("rms_norm", "mosaic", None, x, [w]) == (False, None)
    assert len(caught) == 1
    monkeypatch.setattr(_common, "default_impl", lambda: "mosaic")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _norm_rows_mgpu.choose("rms_norm", None, None, x, [w]) == (False, None)
        x, w = jax.ShapeDtypeStruct((2, 8192), jnp.float32), jax.ShapeDtypeStruct((8192,),
                                                                                jnp.float32)
        assert _norm_rows_mgpu.choose("rms_norm", None, None, x, [w]) == (True, None)


def test_explicit_mosaic_fallback_runs_triton(monkeypatch):
    """End to end through the wrapper: a row over the (here shrunk) SMEM budget warns once and
    gives the Triton path's values and gradients."""
    monkeypatch.setattr(_norm_rows_mgpu, "SMEM_BYTES", 1024)
    x, w, b, dy = _inputs((6, 64), jnp.float32)
    with pytest.warns(UserWarning, match="layer_norm: impl='mosaic' does not support D=64"):
        got = jax.jit(lambda *a: _value_and_grads(
            lambda *a: pk.layer_norm(*a, impl="mosaic"), *a))(dy, x, w, b)
    want = _value_and_grads(pk.layer_norm_reference, dy, x, w, b)
    for g, r in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("over, match", [
    ({"impl": "cuda"}, "impl must be None, 'mosaic' or 'triton'"),
    ({"block_sizes": MosaicBlockSizes(block_rows=-1)}, "block_rows=-1 must be an int"),
    ({"block_sizes": MosaicBlockSizes(block_rows=64), "d": 8192}, "needs .* B of shared memory"),
    ({"block_sizes": BlockSizes()}, "impl='mosaic' takes block_sizes=MosaicBlockSizes"),
    ({"block_sizes": MosaicBlockSizes(), "impl": "triton"}, "impl='triton' takes"),
    ({"block_sizes": 16}, "block_sizes must be a BlockSizes or MosaicBlockSizes"),
    ({"weight": jnp.ones(7)}, r"weight must have shape \(8,\)"),
])
def test_bad_input_is_one_line(over, match):
    args = {"impl": "mosaic", "d": 8} | over
    d = args.pop("d")
    weight = args.pop("weight", jnp.ones(d))
    with pytest.raises(pk.KernelInputError, match=match) as err:
        pk.rms_norm(jnp.ones((64, d)), weight, **args)
    assert "\n" not in str(err.value)
