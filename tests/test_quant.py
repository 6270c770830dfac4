"""Quantization: int8 / int4 error bounds and packing, STE gradients, W8A8, quantized and
int8-KV decode against float decode, QAT through the task interface."""
import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcourse.errors import UserError
from jaxcourse.lm import lm_task
from jaxcourse.models import decode
from jaxcourse.models.transformer import GPT, GPTConfig
from jaxcourse.quant import kv, model as qmodel, weights

TINY = GPTConfig(vocab_size=13, context=16, n_layer=2, n_head=4, n_kv_head=2, d_model=64,
                 attention="xla")
RNG = np.random.default_rng(0)


@functools.lru_cache
def _params():
    params = jax.jit(GPT(TINY).init)(jax.random.key(1), np.zeros((1, 4), np.int32))
    return nn.meta.unbox(params["params"])


def test_int8_per_channel_error_is_at_most_half_a_step():
    w = jnp.asarray(RNG.standard_normal((96, 40), np.float32) * RNG.uniform(0.1, 3, 40))
    q, scale = weights.quantize_int8(w)
    assert q.dtype == jnp.int8 and scale.shape == (40,)
    err = np.abs(np.asarray(weights.dequantize_int8(q, scale) - w))
    assert np.all(err <= np.asarray(scale)[None] / 2 + 1e-6)
    assert np.all(np.abs(np.asarray(q)).max(0) == 127)  # the range is used to the end


@pytest.mark.parametrize("group", weights.GROUPS)
def test_int4_group_error_bound_and_packing(group):
    w = jnp.asarray(RNG.standard_normal((256, 24), np.float32))
    packed, scale = weights.quantize_int4(w, group)
    assert packed.dtype == jnp.uint8 and packed.shape == (128, 24)
    assert scale.shape == (256 // group, 24)
    err = np.abs(np.asarray(weights.dequantize_int4(packed, scale) - w))
    assert np.all(err <= np.repeat(np.asarray(scale), group, 0) / 2 + 1e-6)


def test_int4_pack_round_trip_every_value():
    q = jnp.asarray(RNG.integers(-8, 8, (64, 9)), jnp.int8)
    assert np.array_equal(weights.unpack_int4(weights.pack_int4(q)), q)


def test_bad_scheme_and_group_are_user_errors():
    with pytest.raises(UserError, match="unknown quantization scheme"):
        weights.quantize_params(_params(), "int3")
    with pytest.raises(UserError, match="group size"):
        weights.quantize_int4(jnp.ones((64, 4)), 48)
    with pytest.raises(UserError, match="does not divide"):
        weights.quantize_int4(jnp.ones((96, 4)), 64)


def test_quantized_tree_bytes_and_dequantized_error():
    params = _params()
    dense = sum(w.size * 4 for p, w in jax.tree_util.tree_leaves_with_path(params)
                if weights._path(p)[-1] == "kernel")
    rest = weights.param_bytes(params) - dense
    quantize = jax.jit(weights.quantize_params, static_argnums=1)
    q8 = quantize(params, "int8")
    q4 = quantize(params, "int4-g32")
    # int8: 1 byte per weight + 4 per output channel; int4: half a byte + 4 per 32 weights.
    assert rest + dense / 4 < weights.param_bytes(q8) < rest + dense / 4 * 1.1
    assert rest + dense / 8 < weights.param_bytes(q4) < rest + dense / 8 * 1.3
    back = jax.jit(weights.dequantize_params)(q8)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(back)):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, atol=float(jnp.max(jnp.abs(a))) / 254 + 1e-6)


def test_ste_gradient_is_one_inside_the_clip_range_and_zero_outside():
    x = jnp.linspace(-3.0, 3.0, 61)
    grad = jax.grad(lambda x: qmodel.fake_quant_ste(x, 0.1, -8, 7).sum())(x)
    inside = (x >= -0.8) & (x <= 0.7)
    assert np.array_equal(np.asarray(grad), np.where(inside, 1.0, 0.0))
    y = qmodel.fake_quant_ste(x, 0.1, -8, 7)
    np.testing.assert_allclose(y, np.clip(np.round(x / 0.1), -8, 7) * 0.1, atol=1e-6)


def test_w8a8_matmul_close_to_float():
    x = jnp.asarray(RNG.standard_normal((8, 128), np.float32))
    w = jnp.asarray(RNG.standard_normal((128, 32), np.float32))
    exact = x @ w
    approx = qmodel.w8a8_matmul(x, w)
    rel = float(jnp.linalg.norm(approx - exact) / jnp.linalg.norm(exact))
    assert rel < 0.02


def test_kv_int8_round_trip_per_token_and_head():
    x = jnp.asarray(RNG.standard_normal((2, 5, 3, 16), np.float32))
    q, scale = kv.quantize_kv(x)
    assert q.dtype == jnp.int8 and scale.shape == (2, 5, 3)
    err = np.abs(np.asarray(kv.dequantize_kv(q, scale) - x))
    assert np.all(err <= np.asarray(scale)[..., None] / 2 + 1e-6)


@functools.lru_cache
def _float_decode(prompt_bytes):
    prompt = np.frombuffer(prompt_bytes, np.int32).reshape(2, 4)
    return _prefill_and_step(GPT(TINY), _params(), prompt)


def _prefill_and_step(model, params, prompt):
    @jax.jit
    def run(params, prompt):
        cache, logits = decode.prefill(model, params, prompt, 8)
        cache, nxt = decode.cached_step(model, params, cache, jnp.argmax(logits, -1).astype(
            jnp.int32))
        return cache, jnp.stack([logits, nxt])
    return run(params, prompt)


@pytest.mark.parametrize("scheme,kv_int8,tol", [
    ("float32", True, 0.05), ("int8", False, 0.1), ("w8a8", False, 0.15),
    ("int4-g32", True, 0.6)])
def test_quantized_decode_close_to_float(scheme, kv_int8, tol):
    """Prefill + one step: logits within tol of the float model's (relative to their
    largest), but not bit-equal (the quantization is really applied)."""
    prompt = np.random.default_rng(3).integers(0, TINY.vocab_size, (2, 4), dtype=np.int32)
    _, ref = _float_decode(prompt.tobytes())
    model = qmodel.QuantizedGPT(TINY, scheme, kv_int8=kv_int8)
    qparams = jax.jit(weights.quantize_params, static_argnums=1)(_params(), scheme)
    cache, logits = _prefill_and_step(model, qparams, prompt)
    if kv_int8:
        assert cache["layers"][0]["k"].dtype == jnp.int8
    err = float(jnp.max(jnp.abs(logits - ref)))
    assert 0 < err < tol * float(jnp.max(jnp.abs(ref)))


def test_qat_task_trains_through_fake_quant_with_float_master_weights():
    task = lm_task(TINY)
    params = _params()
    qat = qmodel.qat_task(task, "int4-g32", init_params=params)
    tokens = RNG.integers(0, TINY.vocab_size, (2, 9), dtype=np.int32)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    got, _ = qat.init(None, batch)
    assert got is params
    grads = jax.jit(jax.grad(lambda p: qat.loss(p, {}, batch, jax.random.key(0), True)[0]))(
        params)
    g = grads["blocks"]["layer_0"]["mlp"]["up"]["kernel"]
    assert g.shape == params["blocks"]["layer_0"]["mlp"]["up"]["kernel"].shape
    assert float(jnp.abs(g).sum()) > 0  # the STE lets the gradient through the rounding
    up = params["blocks"]["layer_0"]["mlp"]["up"]["kernel"]
    fq = qmodel.fake_quant_kernel(up, "int4-g32")
    np.testing.assert_allclose(fq, weights.dequantize_int4(*weights.quantize_int4(up, 32)),
                               atol=1e-6)


# qwix tiles int4 within the innermost contraction axis: head_dim 32 lets int4-g32 through.
WIDE_HEADS = dataclasses.replace(TINY, n_head=2, n_kv_head=1)


@functools.lru_cache
def _wide_params():
    params = jax.jit(GPT(WIDE_HEADS).init)(jax.random.key(1), np.zeros((1, 4), np.int32))
    return nn.meta.unbox(params["params"])


@pytest.mark.parametrize("scheme", ["int8", "w8a8", "int4-g32"])
def test_qwix_ptq_agrees_with_the_from_scratch_scheme(scheme):
    from jaxcourse.quant import qwix_ref  # qwix is in the test extra: no skip
    params = _wide_params()
    tokens = np.random.default_rng(4).integers(0, TINY.vocab_size, (2, 8), dtype=np.int32)
    model, qparams = qwix_ref.qwix_ptq(WIDE_HEADS, params, scheme)
    ours = qmodel.QuantizedGPT(WIDE_HEADS, scheme)
    mine = jax.jit(weights.quantize_params, static_argnums=1)(params, scheme)
    ref = jax.jit(lambda p: GPT(WIDE_HEADS).apply({"params": p}, tokens))(params)
    got = jax.jit(lambda p: model.apply({"params": p}, tokens))(qparams)
    scale = float(jnp.max(jnp.abs(ref)))
    err_qwix = float(jnp.max(jnp.abs(got - ref)))
    err_ours = float(jnp.max(jnp.abs(jax.jit(lambda p: ours.apply({"params": p}, tokens))(mine)
                                     - ref)))
    assert 0 < err_qwix < 0.3 * scale and 0 < err_ours < 0.3 * scale
    assert err_ours < 3 * err_qwix and err_qwix < 3 * err_ours  # same scheme, same-size errors
    # int4 is 2 values per byte on both sides; the scales' layouts differ by a few (< 1%).
    assert abs(weights.param_bytes(qparams) / weights.param_bytes(mine) - 1) < 0.01


def test_qwix_qat_trains_through_the_one_task_like_ours():
    from jaxcourse.quant import qwix_ref
    params = _wide_params()
    tokens = np.random.default_rng(5).integers(0, TINY.vocab_size, (2, 9), dtype=np.int32)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    module = qwix_ref.qat_module(WIDE_HEADS, "int4-g32")
    fake = qmodel.fake_quant_params(params, "int4-g32")
    run = jax.jit(lambda m, p: m.apply({"params": p}, batch["inputs"]), static_argnums=0)
    theirs, ours, full = run(module, params), run(GPT(WIDE_HEADS), fake), run(GPT(WIDE_HEADS),
                                                                              params)
    quant_err = float(jnp.max(jnp.abs(ours - full)))
    assert quant_err > 0 and float(jnp.max(jnp.abs(theirs - full))) > 0  # both fake-quantize
    assert float(jnp.max(jnp.abs(theirs - ours))) < 2 * quant_err  # the same scheme
    task = lm_task(WIDE_HEADS, module=module)  # the one LM task, trained by the one loop
    grads = jax.jit(jax.grad(lambda p: task.loss(p, {}, batch, jax.random.key(0), True)[0]))(
        params)
    g = grads["blocks"]["layer_0"]["mlp"]["up"]["kernel"]
    assert float(jnp.abs(g).sum()) > 0  # qwix's STE lets the gradient through the rounding


def test_qwix_refuses_what_it_cannot_tile():
    from jaxcourse.quant import qwix_ref
    assert qwix_ref.supports(WIDE_HEADS, "int4-g32") and not qwix_ref.supports(TINY, "int4-g32")
    with pytest.raises(UserError, match="head_dim 32"):
        qwix_ref.rules(WIDE_HEADS, "int4-g64")
