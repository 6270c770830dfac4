"""flash_attention (interpret mode on CPU) against its jnp reference: output and all gradients.

Each case is one jit of forward + backward, so one compile per case; interpret mode is slow to
compile, hence few, small cases chosen to cover: several blocks per loop (blocks of 16),
lengths that are not multiples of the block, T != S, GQA and MQA, a head_dim that is not a
power of two, causal, sliding window, segments, rows with no key, f32 / bf16 / f16.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk
from pallas_kernels.flash_attention import BlockSizes

SMALL = BlockSizes(16, 16, 16, 16, 16, 16)
# Max error relative to max(1, max|reference|). f32 differs only by summation order. The
# half types round the output and gradients (bf16 eps 7.8e-3, f16 9.8e-4) and the kernel
# also rounds P and dS to the input dtype before the tensor-core dots, as FlashAttention does.
TOL = {jnp.float32: 2e-5, jnp.bfloat16: 3e-2, jnp.float16: 4e-3}


def _inputs(b, t, s, h, kvh, d, dtype, seed=0):
    ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(ks[0], (b, t, h, d), jnp.float32).astype(dtype)
    k = jax.random.normal(ks[1], (b, s, kvh, d), jnp.float32).astype(dtype)
    v = jax.random.normal(ks[2], (b, s, kvh, d), jnp.float32).astype(dtype)
    do = jax.random.normal(ks[3], (b, t, h, d), jnp.float32).astype(dtype)
    return q, k, v, do


def _value_and_grads(attention, q, k, v, do, **kw):
    out, vjp = jax.vjp(lambda q, k, v: attention(q, k, v, **kw), q, k, v)
    return (out,) + vjp(do)


def _assert_close(got, want, dtype, what):
    got = np.asarray(got, np.float32)
    want = np.asarray(want, np.float32)
    assert got.shape == want.shape, what
    assert np.all(np.isfinite(got)), f"{what}: non-finite values"
    err = np.max(np.abs(got - want)) / max(1.0, np.max(np.abs(want)))
    assert err <= TOL[dtype], f"{what}: relative error {err:.2e} > {TOL[dtype]:.0e}"


def _segments(lengths, batch=1):
    ids = np.concatenate([np.full(n, i) for i, n in enumerate(lengths)])
    return jnp.asarray(np.tile(ids, (batch, 1)), jnp.int32)


CASES = {
    # name: ((B, T, S, H, KVH, D), dtype, kwargs, block sizes or None for the defaults)
    "f32-plain": ((1, 40, 40, 2, 2, 16), jnp.float32, {}, SMALL),
    "f32-causal-gqa-T!=S-d24": ((2, 37, 29, 4, 2, 24), jnp.float32, {"causal": True}, SMALL),
    "bf16-causal-mqa-defaults": ((1, 48, 48, 2, 1, 32), jnp.bfloat16, {"causal": True}, None),
    "f32-window": ((1, 50, 50, 2, 2, 16), jnp.float32, {"window": (7, 3)}, SMALL),
    "bf16-causal-window-gqa": ((1, 33, 33, 4, 2, 16), jnp.bfloat16,
                               {"causal": True, "window": 5, "sm_scale": 0.3}, SMALL),
    "f32-causal-segments": ((2, 45, 45, 2, 2, 16), jnp.float32,
                            {"causal": True, "segment_ids": _segments([10, 20, 15], 2)}, SMALL),
    # Query segment 2 (rows 20..35) has no key: those rows must come out exactly 0.
    "f16-segment-pair-T!=S-orphans": (
        (1, 36, 20, 2, 2, 64), jnp.float16,
        {"segment_ids": (_segments([8, 12, 16]), _segments([10, 10]))}, SMALL),
}
ORPHAN_ROWS = {"f16-segment-pair-T!=S-orphans": slice(20, 36)}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference(name):
    shape, dtype, kw, blocks = CASES[name]
    q, k, v, do = _inputs(*shape, dtype)
    kernel = jax.jit(lambda *a: _value_and_grads(
        pk.flash_attention, *a, interpret=True, block_sizes=blocks, **kw))
    reference = jax.jit(lambda *a: _value_and_grads(pk.flash_attention_reference, *a, **kw))
    got = kernel(q, k, v, do)
    for what, g, want in zip(("out", "dq", "dk", "dv"), got, reference(q, k, v, do)):
        _assert_close(g, want, dtype, f"{name} {what}")
    if name in ORPHAN_ROWS:
        out, dq = np.asarray(got[0]), np.asarray(got[1])
        np.testing.assert_array_equal(out[:, ORPHAN_ROWS[name]], 0.0)
        np.testing.assert_array_equal(dq[:, ORPHAN_ROWS[name]], 0.0)


@pytest.mark.parametrize("kw", [{}, {"causal": True}, {"window": (3, 1)},
                                {"causal": True, "window": 4}])
def test_reference_matches_jax_dot_product_attention(kw):
    """The oracle itself: same masks and GQA semantics as jax.nn.dot_product_attention."""
    q, k, v, _ = _inputs(2, 12, 12, 4, 2, 8, jnp.float32)
    want = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, is_causal=kw.get("causal", False), local_window_size=kw.get("window"),
        implementation="xla"))(q, k, v)
    got = jax.jit(lambda q, k, v: pk.flash_attention_reference(q, k, v, **kw))(q, k, v)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)


def test_differentiation_uses_pallas_kernels():
    q, k, v, _ = _inputs(1, 16, 16, 2, 1, 16, jnp.float32)
    loss = lambda q, k, v: pk.flash_attention(q, k, v, causal=True, interpret=True).sum()
    jaxpr = str(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v))
    # forward, dK/dV and dQ; no XLA recomputation of the attention matrix
    assert jaxpr.count("pallas_call[") == 3
    assert "flash_attention_dkv" in jaxpr and "flash_attention_dq" in jaxpr


def _bad(**over):
    q, k, v, _ = _inputs(1, 8, 8, 4, 2, 16, jnp.float32)
    args = {"q": q, "k": k, "v": v} | over
    return args.pop("q"), args.pop("k"), args.pop("v"), args


@pytest.mark.parametrize("over, match", [
    ({"q": jnp.zeros((8, 4, 16))}, "q must be"),
    ({"k": jnp.zeros((1, 8, 2, 16), jnp.int32)}, "k has dtype int32"),
    ({"v": jnp.zeros((1, 8, 2, 16), jnp.bfloat16)}, "share a dtype"),
    ({"k": jnp.zeros((1, 8, 3, 16)), "v": jnp.zeros((1, 8, 3, 16))}, "multiple of k/v heads"),
    ({"v": jnp.zeros((1, 9, 2, 16))}, "k and v must have the same shape"),
    ({"k": jnp.zeros((1, 8, 2, 8)), "v": jnp.zeros((1, 8, 2, 8))}, "head_dim"),
    ({"window": -1}, "window"),
    ({"window": (1, 2, 3)}, "window"),
    ({"segment_ids": jnp.zeros((1, 7), jnp.int32)}, r"segment_ids \(query\) must have shape"),
    ({"segment_ids": jnp.zeros((1, 8))}, "must be integers"),
    ({"sm_scale": jnp.float32(0.5)}, "sm_scale"),
    ({"block_sizes": BlockSizes(block_q=48)}, "power of two"),
])
def test_bad_input_names_the_argument(over, match):
    q, k, v, kw = _bad(**over)
    with pytest.raises(pk.KernelInputError, match=match):
        pk.flash_attention(q, k, v, **kw)
