"""RWKV-6's WKV (chunked vs recurrence vs a transliteration of the naive reference), RetNet's
three retention modes, and both mixers decoding from their fixed-size states."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcourse.errors import UserError
from jaxcourse.models import retnet, rwkv
from jaxcourse.models.transformer import GPT, GPTConfig, gpt_config, model_section
from test_ssm import TINY, decodes_like_the_full_forward, init_params, state_shapes

TOL = dict(rtol=1e-5, atol=1e-5)


def _rand(rng, *shape, scale=1.0):
    return jnp.asarray(rng.normal(size=shape) * scale, jnp.float32)


def _wkv_inputs(b=2, l=21, h=3, dk=4, dv=5, decay_scale=1.0, seed=0):
    rng = np.random.default_rng(seed)
    return (_rand(rng, b, l, h, dk), _rand(rng, b, l, h, dk), _rand(rng, b, l, h, dv),
            -jnp.exp(_rand(rng, b, l, h, dk) + np.log(decay_scale)), _rand(rng, h, dk),
            _rand(rng, b, h, dk, dv))


def _naive_rwkv6(r, k, v, w, u, scale, S):
    """naive_recurrent_rwkv6's loop over numpy, in its own [b, h, t, d] layout."""
    r, k, v, w = (np.moveaxis(np.asarray(x, np.float64), 1, 2) for x in (r, k, v, w))
    u, S = np.asarray(u, np.float64), np.asarray(S, np.float64).copy()
    o = np.zeros(v.shape)
    for i in range(r.shape[2]):
        kv = k[:, :, i, :, None] * v[:, :, i, None, :]
        o[:, :, i] = ((S + u[None, :, :, None] * kv) * (r[:, :, i, :, None] * scale)).sum(-2)
        S = S * np.exp(w[:, :, i])[..., None] + kv
    return np.moveaxis(o, 2, 1), S


def test_wkv6_computes_the_naive_reference():
    r, k, v, w, u, S0 = _wkv_inputs()
    o, S = rwkv.wkv6(r, k, v, w, u, 0.5, S0, impl="recurrent")
    o_ref, S_ref = _naive_rwkv6(r, k, v, w, u, 0.5, S0)
    np.testing.assert_allclose(o, o_ref, **TOL)
    np.testing.assert_allclose(S, S_ref, **TOL)


@pytest.mark.parametrize("decay_scale", [1.0, 30.0])  # 30: decays near 0 (exp(-30)) stay finite
def test_wkv6_chunked_equals_the_recurrence_in_values_and_gradients(decay_scale):
    args = _wkv_inputs(decay_scale=decay_scale)

    def run(impl):
        def loss(r, k, v, w, u, S0):
            o, S = rwkv.wkv6(r, k, v, w, u, 0.5, S0, impl=impl, chunk=8)  # 21 = 2 x 8 + 5
            return jnp.sum(jnp.sin(o)) + jnp.sum(S ** 2), (o, S)
        (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(6)),
                                                     has_aux=True))(*args)
        return out + grads

    for got, ref in zip(run("chunked"), run("recurrent"), strict=True):
        assert np.isfinite(got).all()
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=2e-5)


def _naive_retention(q, k, v):
    """fla's naive_retention over numpy, in its [b, h, t, d] layout."""
    q, k, v = (np.moveaxis(np.asarray(x, np.float64), 1, 2) for x in (q, k, v))
    h, t, d = q.shape[1], q.shape[2], q.shape[3]
    gamma = 1 - 2.0 ** (-5.0 - np.arange(h))
    n = np.arange(t)
    decay = gamma[:, None, None] ** (n[:, None] - n[None, :]) * (n[:, None] >= n[None, :])
    s = np.einsum("bhqd,bhkd,hqk->bhqk", q * d ** -0.5, k, decay)
    return np.moveaxis(np.einsum("bhqk,bhkd->bhqd", s, v), 2, 1)


def test_retention_modes_agree_with_each_other_and_the_naive_reference():
    rng = np.random.default_rng(3)
    q, k, v = _rand(rng, 2, 19, 3, 4), _rand(rng, 2, 19, 3, 4), _rand(rng, 2, 19, 3, 6)
    ref = _naive_retention(q, k, v)
    grads = {}
    for mode in retnet.RETENTION_MODES:
        fn = jax.jit(lambda q, k, v, mode=mode: retnet.retention(q, k, v, mode=mode, chunk=8))
        np.testing.assert_allclose(fn(q, k, v), ref, rtol=1e-5, atol=2e-5, err_msg=mode)
        grads[mode] = jax.jit(jax.grad(lambda *a, fn=fn: jnp.sum(jnp.sin(fn(*a))),
                                       argnums=(0, 1, 2)))(q, k, v)
    for mode in ("recurrent", "chunkwise"):
        for g, g_ref in zip(grads[mode], grads["parallel"], strict=True):
            np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=2e-5, err_msg=mode)


def test_retention_continues_from_a_state_in_every_mode():
    rng = np.random.default_rng(4)
    q, k, v = _rand(rng, 1, 12, 2, 4), _rand(rng, 1, 12, 2, 4), _rand(rng, 1, 12, 2, 4)
    whole = retnet.retention(q, k, v)
    for mode in retnet.RETENTION_MODES:
        o1, S = retnet.retention_with_state(q[:, :7], k[:, :7], v[:, :7], mode=mode, chunk=4)
        o2, _ = retnet.retention_with_state(q[:, 7:], k[:, 7:], v[:, 7:], mode=mode, chunk=4,
                                            initial_state=S)
        np.testing.assert_allclose(jnp.concatenate([o1, o2], 1), whole, **TOL, err_msg=mode)


@pytest.mark.parametrize("mixer,options", [("rwkv", {"chunk": 4, "mix_rank": 4,
                                                     "decay_rank": 4}),
                                           ("retnet", {"chunk": 4})])
def test_rwkv_and_retnet_decode_from_a_constant_size_state(mixer, options):
    cfg = GPTConfig(**dict(TINY, n_layer=1), mixer=mixer, options={mixer: options})
    decodes_like_the_full_forward(cfg)
    small, large = state_shapes(cfg, mixer)
    assert small == large


@pytest.mark.parametrize("scan", [False, True])
def test_rwkv_lm_with_the_channel_mix_ffn_decodes_exactly(scan):
    # the channel-mix's token shift is the ffn's own decode state, beside the mixer's
    cfg = GPTConfig(**dict(TINY, n_layer=2), mixer="rwkv", ffn="rwkv_cmix", scan_layers=scan,
                    options={"rwkv": {"chunk": 4, "mix_rank": 4, "decay_rank": 4}})
    decodes_like_the_full_forward(cfg)
    cache = GPT(cfg).init_cache(2, 8)["layers"][0]
    assert cache["ffn"]["shift"].shape == (2, 2, 16)  # [repeats, batch, d_model]
    small, large = state_shapes(cfg, "rwkv")
    assert small == large


def test_rwkv_channel_mix_ffn_is_causal():
    cfg = GPTConfig(**dict(TINY, n_layer=1), ffn="rwkv_cmix")
    params = init_params(cfg)
    assert params["blocks"]["layer_0"]["rwkv_cmix"]["key"]["kernel"].shape == (16, 64)
    emb = params["embed"]["embedding"]

    def logits_at_5(x_BxTxD):  # tokens are discrete: differentiate through embeddings
        return GPT(cfg).apply({"params": params}, jnp.zeros((1, 0), jnp.int32),
                              prefix_BxPxD=x_BxTxD)[0, 5].sum()

    x = emb[np.arange(10) % 11][None]
    g = jax.jit(jax.grad(logits_at_5))(x)
    assert float(jnp.abs(g[0, :6]).max()) > 1e-4   # sees the past (and the token shift)
    assert float(jnp.abs(g[0, 6:]).max()) == 0.0   # never the future


@pytest.mark.parametrize("mixer,key,value,match", [
    ("rwkv", "chunk", 12, r"model.rwkv.chunk=12 must be a positive power of two"),
    ("retnet", "chunk", 3, r"model.retnet.chunk=3 must be a positive power of two"),
    ("retnet", "mode", "fast", r"model.retnet.mode='fast' is not one of parallel"),
])
def test_bad_options_are_one_line_errors_naming_the_key(mixer, key, value, match):
    section = model_section(mixer=mixer)
    section[mixer][key] = value
    with pytest.raises(UserError, match=match) as err:
        gpt_config(section)
    assert "\n" not in str(err.value)


def test_bad_call_arguments_are_one_line_errors():
    r, k, v, w, u, _ = _wkv_inputs(l=8)
    with pytest.raises(UserError, match="chunk=6 must be a positive power of two"):
        rwkv.wkv6(r, k, v, w, u, chunk=6)
    with pytest.raises(UserError, match=r"u \(4,\) \[h, K\]"):
        rwkv.wkv6(r, k, v, w, u[0])
    with pytest.raises(UserError, match="mode='flash' is not one of"):
        retnet.retention(r, k, v, mode="flash")
