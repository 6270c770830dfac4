"""flash_attention(impl="mosaic") in Mosaic GPU interpret mode vs its jnp reference (output and
dq, dk, dv), the abstract-H100 lowering of its three kernels, the Triton fallback and bad input.

Interpret mode simulates every warpgroup, barrier and TMA copy, so the cases are tiny (D <= 64,
the smallest legal 64-row tiles) and each is one jit of forward + backward.
"""
import importlib
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk
from pallas_kernels import _common
from pallas_kernels.flash_attention import BlockSizes
from pallas_kernels.flash_attention_mgpu import (SMEM_BYTES, MosaicBlockSizes,
                                                 default_block_sizes, forward_smem_bytes)
from pallas_kernels.gpu_check import mosaic_gpu_kernels

fa = importlib.import_module("pallas_kernels.flash_attention")   # the module, not the function

SMALL = MosaicBlockSizes(block_q=64, block_kv=64, num_stages=2, block_q_dkv=64,
                         block_kv_dkv=64, block_q_dq=64, block_kv_dq=64, bwd_stages=2)
# Max error relative to max(1, max|reference|): the half types round the output, P and dS.
TOL = {jnp.bfloat16: 3e-2, jnp.float16: 4e-3}


def _inputs(b, t, s, h, kvh, d, dtype, seed=0):
    # numpy draws: no jax compile per shape (this file runs against a time budget)
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.standard_normal(shape, np.float32), dtype)
                 for shape in ((b, t, h, d), (b, s, kvh, d), (b, s, kvh, d), (b, t, h, d)))


def _segments(lengths):
    ids = np.concatenate([np.full(n, i) for i, n in enumerate(lengths)])
    return jnp.asarray(ids[None], jnp.int32)


def _value_and_grads(attention, q, k, v, do, **kw):
    out, vjp = jax.vjp(lambda q, k, v: attention(q, k, v, **kw), q, k, v)
    return (out,) + vjp(do)


CASES = {
    # name: ((B, T, S, H, KVH, D), dtype, kwargs)
    # No mask at all (whole blocks), T != S, head_dim 40 padded to 64 inside the wrapper.
    "bf16-plain-T!=S-d40": ((1, 128, 192, 2, 2, 40), jnp.bfloat16, {}),
    # T, S not multiples of 64. Two CTAs of 128 rows over 5 key blocks: the causal skip gives
    # CTA 0 two blocks, CTA 1 four; key block 4 has no query (an empty dK/dV pipeline).
    "f16-causal-mqa-T!=S": ((1, 190, 300, 2, 1, 64), jnp.float16, {"causal": True}),
    "bf16-window-gqa": ((1, 150, 150, 4, 2, 64), jnp.bfloat16,
                        {"window": (40, 10), "sm_scale": 0.3}),
    # Query segment 2 (rows 70..99) has no key: those rows must come out exactly 0.
    "f16-causal-segment-pair-T!=S-orphans": (
        (1, 100, 70, 2, 2, 64), jnp.float16,
        {"causal": True, "segment_ids": (_segments([30, 40, 30]), _segments([35, 35]))}),
}
ORPHAN_ROWS = {"f16-causal-segment-pair-T!=S-orphans": slice(70, 100)}


@pytest.mark.parametrize("name", list(CASES))
def test_mosaic_matches_reference(name):
    shape, dtype, kw = CASES[name]
    q, k, v, do = _inputs(*shape, dtype)
    kernel = jax.jit(lambda *a: _value_and_grads(
        pk.flash_attention, *a, impl="mosaic", block_sizes=SMALL, **kw))
    reference = jax.jit(lambda *a: _value_and_grads(pk.flash_attention_reference, *a, **kw))
    outs = kernel(q, k, v, do)
    for what, got, want in zip(("out", "dq", "dk", "dv"), outs, reference(q, k, v, do)):
        got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
        assert got.shape == want.shape and np.all(np.isfinite(got)), f"{name} {what}"
        err = np.max(np.abs(got - want)) / max(1.0, np.max(np.abs(want)))
        assert err <= TOL[dtype], f"{name} {what}: relative error {err:.2e}"
    if name in ORPHAN_ROWS:
        for got in outs[:2]:      # out and dq
            np.testing.assert_array_equal(np.asarray(got)[:, ORPHAN_ROWS[name]], 0.0)


def test_differentiation_runs_three_mosaic_kernels():
    q, k, v, _ = _inputs(1, 64, 64, 2, 1, 64, jnp.bfloat16)
    loss = lambda q, k, v: pk.flash_attention(q, k, v, causal=True, impl="mosaic").astype(
        jnp.float32).sum()
    jaxpr = str(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v))
    # forward, dK/dV, dQ as plgpu.kernel calls; no Triton kernel
    assert jaxpr.count("= mpmd_map[") == 3 and "pallas_call[" not in jaxpr
    # the only XLA contraction left is D = rowsum(dO * O): no [T, S] attention matrix
    assert jaxpr.count("= dot_general[") == 1


@pytest.mark.parametrize("dim, kw", [
    (64, {"causal": True}), (128, {"causal": True}),
    (256, {"window": (256, 0), "segments": True}),
])
def test_lowers_for_h100_at_production_shapes(dim, kw):
    """Layout inference, wgmma operand rules, TMA/swizzle and the 227 KiB SMEM budget."""
    s = jax.ShapeDtypeStruct
    q = s((2, 4096, 16, dim), jnp.bfloat16)
    kv = s((2, 4096, 4, dim), jnp.bfloat16)
    kw = dict(kw)
    segments = kw.pop("segments", False)

    def step(q, k, v, ids):
        loss = lambda q, k, v: pk.flash_attention(
            q, k, v, impl="mosaic", interpret=False, segment_ids=ids if segments else None,
            **kw).astype(jnp.float32).sum()
        return jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v)
    modules = mosaic_gpu_kernels(step, q, kv, kv, s((2, 4096), jnp.int32))
    assert len(modules) == 3 and min(modules) > 1000      # forward, dK/dV, dQ


@pytest.mark.parametrize("dim", [64, 128, 256])
def test_default_blocks_fit_hopper_shared_memory(dim):
    assert forward_smem_bytes(default_block_sizes(dim), dim) <= SMEM_BYTES


def test_default_impl_off_gpu_is_triton():
    assert _common.default_impl() == "triton"
    assert not fa._ptxas_miscompiles_masks()       # cuda_versions is None on CPU


def test_float32_warns_once_and_runs_triton():
    q, k, v, _ = _inputs(1, 20, 20, 2, 1, 16, jnp.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = pk.flash_attention(q, k, v, causal=True, impl="mosaic", block_sizes=SMALL)
    ours = [w for w in caught if "impl='mosaic'" in str(w.message)]
    assert len(ours) == 1 and "dtype float32" in str(ours[0].message)
    want = pk.flash_attention_reference(q, k, v, causal=True)
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(want, np.float32),
                               atol=3e-2)


def test_default_choice_moves_float32_to_triton_silently(monkeypatch):
    """impl=None on a Hopper picks mosaic; a float32 model then runs Triton without a warning
    on every trace (only an explicit impl="mosaic" warns)."""
    monkeypatch.setattr(_common, "default_impl", lambda: "mosaic")
    q, k, v, _ = _inputs(1, 20, 20, 2, 1, 16, jnp.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = pk.flash_attention(q, k, v, causal=True)
    want = pk.flash_attention_reference(q, k, v, causal=True)
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), atol=2e-5)


@pytest.mark.parametrize("over, match", [
    ({"impl": "cuda"}, "impl must be None, 'mosaic' or 'triton'"),
    ({"block_sizes": MosaicBlockSizes(block_q=96)}, "block_q=96 must be a positive multiple"),
    ({"block_sizes": MosaicBlockSizes(block_kv=32)}, "block_kv=32"),
    ({"block_sizes": MosaicBlockSizes(num_stages=1)}, "num_stages=1 must be >= 2"),
    ({"block_sizes": MosaicBlockSizes(block_q=256, block_kv=256, num_stages=4)},
     "shared memory"),
    ({"block_sizes": BlockSizes()}, "takes block_sizes=MosaicBlockSizes"),
    ({"v": jnp.zeros((1, 8, 2, 64), jnp.float16)}, "share a dtype"),
    ({"k": jnp.zeros((2, 8, 2, 64), jnp.bfloat16), "v": jnp.zeros((2, 8, 2, 64), jnp.bfloat16)},
     "disagree on batch"),
    ({"k": jnp.zeros((1, 8, 3, 64), jnp.bfloat16), "v": jnp.zeros((1, 8, 3, 64), jnp.bfloat16)},
     "multiple of k/v heads"),
])
def test_bad_input_is_one_line(over, match):
    q, k, v, _ = _inputs(1, 8, 8, 4, 2, 64, jnp.bfloat16)
    args = {"q": q, "k": k, "v": v, "impl": "mosaic"} | over
    with pytest.raises(pk.KernelInputError, match=match) as err:
        pk.flash_attention(args.pop("q"), args.pop("k"), args.pop("v"), **args)
    assert "\n" not in str(err.value)


def test_triton_rejects_mosaic_block_sizes():
    q, k, v, _ = _inputs(1, 8, 8, 2, 2, 16, jnp.float32)
    with pytest.raises(pk.KernelInputError, match="impl='triton' takes"):
        pk.flash_attention(q, k, v, impl="triton", block_sizes=SMALL)


def test_masking_on_bad_ptxas_falls_back(monkeypatch):
    """CUDA 12.8.0-12.9.0: causal / window calls take the Triton path; unmasked ones stay."""
    monkeypatch.setattr(fa, "_ptxas_miscompiles_masks", lambda: True)
    q, k, v, _ = _inputs(1, 16, 16, 2, 1, 16, jnp.bfloat16)
    with pytest.warns(UserWarning, match="masking on CUDA 12.8.0-12.9.0"):   # None: use Triton
        assert fa._mosaic(q, k, v, True, None, None, None, None, None, warn=True) is None
    assert fa._mosaic_unsupported(q, masked=False) is None


def test_head_dim_over_256_falls_back():
    q = jax.ShapeDtypeStruct((1, 8, 2, 320), jnp.bfloat16)
    assert "head_dim 320 > 256" in fa._mosaic_unsupported(q, masked=False)
