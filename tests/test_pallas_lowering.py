"""The GPU path without a GPU: lower forward + backward for an abstract H100 (Pallas' Triton
lowering) and run the Triton dialect verifier on every kernel. No compilation happens, so
these are fast; PTX generation is still only checked on a real GPU."""
import warnings

import jax
import jax.numpy as jnp
import pytest

import pallas_kernels as pk
from pallas_kernels import _common
from pallas_kernels.gpu_check import lower_for_gpu

S = jax.ShapeDtypeStruct


def _lower(fn, *args):
    with warnings.catch_warnings():       # "The Pallas Triton backend is deprecated"
        warnings.simplefilter("ignore", DeprecationWarning)
        return lower_for_gpu(fn, *args)


def _grads(fn, n):
    return jax.grad(lambda *a: fn(*a).astype(jnp.float32).sum(), argnums=tuple(range(n)))


@pytest.mark.parametrize("dtype, shape, kw", [
    # (B, T, S, H, KVH, D): production-like sizes cost nothing here (no compile)
    (jnp.bfloat16, (2, 4096, 4096, 16, 4, 128), {"causal": True}),
    (jnp.float16, (2, 1000, 1000, 8, 8, 80), {"window": (256, 0), "segments": True}),
    (jnp.float32, (1, 300, 200, 4, 1, 64), {}),
])
def test_attention_lowers_to_verified_triton(dtype, shape, kw):
    b, t, s, h, kvh, d = shape
    args = [S((b, t, h, d), dtype), S((b, s, kvh, d), dtype), S((b, s, kvh, d), dtype)]
    kw = dict(kw)
    if kw.pop("segments", False):
        args.append(S((b, t), jnp.int32))
    attention = lambda q, k, v, *seg: pk.flash_attention(
        q, k, v, segment_ids=seg[0] if seg else None, interpret=False, **kw)
    kernels = _lower(_grads(attention, 3), *args)
    assert [k.name for k in kernels] == [
        "flash_attention_fwd", "flash_attention_dkv", "flash_attention_dq"]
    assert all(k.verified for k in kernels)
    assert all("tt.dot" in k.ir for k in kernels)        # matmuls went to tensor-core dots
    pad_t = _common.round_up(t, 128)
    assert kernels[0].grid == (pad_t // 128, b, h)       # (query blocks, batch, heads)
    assert kernels[0].num_warps == (4 if d <= 64 else 8)


@pytest.mark.parametrize("features", [100, 4096])
def test_norms_lower_to_verified_triton(features):
    x, p = S((4, 33, features), jnp.bfloat16), S((features,), jnp.bfloat16)
    rms = _lower(_grads(lambda x, w: pk.rms_norm(x, w, impl="triton", interpret=False), 2), x, p)
    ln = _lower(_grads(lambda x, w, b: pk.layer_norm(x, w, b, impl="triton", interpret=False),
                       3), x, p, p)
    assert [k.name for k in rms + ln] == [
        "rms_norm_fwd", "rms_norm_bwd", "layer_norm_fwd", "layer_norm_bwd"]
    assert all(k.verified for k in rms + ln)
    rows_per_block = max(1, 4096 // _common.next_pow2(features))
    assert rms[0].grid == (_common.round_up(4 * 33, rows_per_block) // rows_per_block, 1, 1)


def test_interpret_defaults_to_cpu_interpreter():
    assert jax.default_backend() == "cpu"
    assert _common.resolve_interpret(None) is True
    assert _common.resolve_interpret(False) is False
