"""Attention: implementations agree, masks, MQA/GQA vs MHA, RoPE, norms, positions."""
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcourse.errors import UserError
from jaxcourse.models import attention as attn_lib
from jaxcourse.models import layers


def _need_kernel(name):
    try:
        layers.pallas_kernel(name)
    except UserError:
        pytest.skip(f"pallas_kernels.{name} not written yet")


def _qkv(b=2, t=8, h=4, kvh=2, d=8, seed=0):
    rng = np.random.default_rng(seed)  # numpy inputs: no per-shape XLA compiles
    return tuple(rng.standard_normal(shape, np.float32)
                 for shape in [(b, t, h, d), (b, t, kvh, d), (b, t, kvh, d)])


# One compiled program per call signature instead of dozens of eagerly compiled ops.
_attend = jax.jit(attn_lib.dot_product_attention, static_argnames=("impl", "causal", "window"))


def _naive_attention(q, k, v, allowed_TxS):
    """Loop-free but layout-obvious oracle: repeat kv heads, softmax over allowed keys."""
    rep = q.shape[2] // k.shape[2]
    k, v = np.repeat(np.asarray(k), rep, axis=2), np.repeat(np.asarray(v), rep, axis=2)
    logits = np.einsum("bthd,bshd->bhts", np.asarray(q), k) / np.sqrt(q.shape[-1])
    logits = np.where(allowed_TxS, logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhts,bshd->bthd", p, v)


def test_mask_matches_hand_written_window():
    mask = attn_lib.attention_mask(jnp.arange(5), jnp.arange(5), causal=True, window=2)[0]
    expected = np.array([[1, 0, 0, 0, 0],
                         [1, 1, 0, 0, 0],
                         [0, 1, 1, 0, 0],
                         [0, 0, 1, 1, 0],
                         [0, 0, 0, 1, 1]], bool)
    np.testing.assert_array_equal(mask, expected)


@pytest.mark.parametrize("causal,window", [(True, 0), (True, 3), (False, 0), (False, 2)])
def test_impls_agree_with_naive_reference(causal, window):
    q, k, v = _qkv()
    t = q.shape[1]
    i, j = np.arange(t)[:, None], np.arange(t)[None, :]
    allowed = np.ones((t, t), bool)
    if causal:
        allowed &= j <= i
    if window:
        allowed &= (j > i - window) & ((j < i + window) | causal)
    expected = _naive_attention(q, k, v, allowed)
    for impl in ("einsum", "xla"):
        out, _ = _attend(q, k, v, impl=impl, causal=causal, window=window)
        np.testing.assert_allclose(out, expected, atol=1e-5, err_msg=impl)


def test_pallas_impl_matches_einsum():
    _need_kernel("flash_attention")
    q, k, v = _qkv(b=1, t=16, h=2, kvh=1, d=8)
    for window in (0, 5):
        ref, _ = _attend(q, k, v, impl="einsum", window=window)
        out, _ = _attend(q, k, v, impl="pallas", window=window)
        np.testing.assert_allclose(out, ref, atol=2e-5, err_msg=f"window={window}")


def test_padding_and_query_offsets_use_explicit_mask():
    q, k, v = _qkv(t=6)
    valid = jnp.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], bool)
    q_last = q[:, 3:5]  # Two queries at positions 3 and 4 over all six keys.
    pos = jnp.array([3, 4])
    outs = [_attend(q_last, k, v, impl=impl, q_positions=pos, kv_valid=valid)[0]
            for impl in ("einsum", "xla")]
    np.testing.assert_allclose(outs[0], outs[1], atol=1e-5)
    i, j = np.array([3, 4])[:, None], np.arange(6)[None, :]
    allowed = (j <= i) & np.asarray(valid)[:, None, None, :]  # [B,1,T,S] via broadcasting
    for b in range(2):
        expected = _naive_attention(q_last[b:b + 1], k[b:b + 1], v[b:b + 1], allowed[b])
        np.testing.assert_allclose(outs[0][b:b + 1], expected, atol=1e-5)


def test_window_blocks_gradient_from_outside_keys():
    q, k, v = _qkv(b=1, t=8)
    grad = jax.jit(jax.grad(lambda v_: attn_lib.dot_product_attention(
        q, k, v_, impl="xla", window=3)[0][0, 6].sum()))(v)
    # Query 6 with window 3 reads keys 4, 5, 6 only.
    touched = np.abs(np.asarray(grad[0])).sum(axis=(1, 2)) > 0
    np.testing.assert_array_equal(touched, [False] * 4 + [True] * 3 + [False])


def _attention_module(kvh):
    return attn_lib.Attention(n_head=4, n_kv_head=kvh, head_dim=8, d_model=32, impl="einsum",
                              rope=True)


@pytest.mark.parametrize("kvh", [1, 2])
def test_gqa_and_mqa_equal_mha_with_repeated_kv_heads(kvh):
    x = np.random.default_rng(1).standard_normal((2, 8, 32), np.float32)
    pos = np.arange(8)
    gqa = _attention_module(kvh)
    params = nn.meta.unbox(jax.jit(gqa.init)(jax.random.key(2), x, pos)["params"])
    mha_params = dict(params)
    for name in ("key", "value"):  # kernel [D, K, hd] -> [D, H, hd], head h reads h // G
        mha_params[name] = {"kernel": jnp.repeat(params[name]["kernel"], 4 // kvh, axis=1)}
    out_gqa, _ = jax.jit(gqa.apply)({"params": params}, x, pos)
    out_mha, _ = jax.jit(_attention_module(4).apply)({"params": mha_params}, x, pos)
    np.testing.assert_allclose(out_gqa, out_mha, atol=1e-5)
    chex.assert_shape(params["key"]["kernel"], (32, kvh, 8))


def test_rope_scores_depend_only_on_relative_position():
    q, k = np.random.default_rng(3).standard_normal((2, 1, 1, 1, 16), np.float32)
    rope = jax.jit(layers.apply_rope)

    def score(m, n):
        return float(jnp.sum(rope(q, np.array([m])) * rope(k, np.array([n]))))

    for m, n, shift in [(5, 2, 7), (0, 9, 30), (3, 3, 100)]:
        assert score(m, n) == pytest.approx(score(m + shift, n + shift), abs=1e-4)
    assert score(5, 2) != pytest.approx(score(5, 3), abs=1e-3)  # it does see the offset
    # Rotation keeps norms: position 0 is the identity and every position is orthogonal.
    np.testing.assert_allclose(rope(q, np.array([0])), q, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(rope(q, np.array([17]))), np.linalg.norm(q),
                               rtol=1e-5)


def test_rope_closed_form_at_position_1():
    """Pins the direction and the layout, which the relative-position test cannot see (rotating
    q and k both by -theta keeps every score a function of m - n). D=4, "rotate half" pairs
    (x0, x2) at frequency 1 and (x1, x3) at 10000^(-1/2): at position 1 the angles are 1 and
    0.01 rad, counter-clockwise: (a, b) -> (a cos t - b sin t, a sin t + b cos t)."""
    x = np.array([1.0, 2.0, 3.0, 4.0], np.float32).reshape(1, 1, 1, 4)
    out = np.asarray(layers.apply_rope(x, np.array([1]))).ravel()
    t0, t1 = 1.0, 0.01
    want = [1 * np.cos(t0) - 3 * np.sin(t0), 2 * np.cos(t1) - 4 * np.sin(t1),
            1 * np.sin(t0) + 3 * np.cos(t0), 2 * np.sin(t1) + 4 * np.cos(t1)]
    np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-6)


def test_sinusoidal_table_closed_form():
    table = layers.sinusoidal_table(jnp.arange(4), 6)
    pos, i = 3, 1  # column i holds sin(pos / 10000^(i/3)), column 3 + i the cosine
    np.testing.assert_allclose(table[pos, i], np.sin(pos / 10000 ** (i / 3)), rtol=1e-5)
    np.testing.assert_allclose(table[pos, 3 + i], np.cos(pos / 10000 ** (i / 3)), rtol=1e-5)
    chex.assert_shape(table, (4, 6))


@pytest.mark.parametrize("kind,flax_cls", [("rmsnorm", nn.RMSNorm), ("layernorm", nn.LayerNorm)])
def test_norm_matches_flax(kind, flax_cls):
    x = np.random.default_rng(4).standard_normal((2, 3, 16), np.float32) * 3 + 1
    ours = layers.Norm(kind, eps=1e-6)
    params = {"scale": 1 + 0.1 * np.arange(16, dtype=np.float32)}
    if kind == "layernorm":
        params["bias"] = 0.05 * np.arange(16, dtype=np.float32)
    ref = flax_cls(epsilon=1e-6).apply({"params": params}, x)
    np.testing.assert_allclose(ours.apply({"params": params}, x), ref, atol=1e-5)


def test_pallas_norm_matches_flax():
    _need_kernel("rms_norm")
    _need_kernel("layer_norm")
    x = np.random.default_rng(6).standard_normal((2, 8, 32), np.float32)
    for kind in ("rmsnorm", "layernorm"):
        ref_mod, pl_mod = layers.Norm(kind), layers.Norm(kind, impl="pallas")
        params = {"scale": 1 + 0.1 * np.arange(32, dtype=np.float32)}
        if kind == "layernorm":
            params["bias"] = 0.05 * np.arange(32, dtype=np.float32)
        np.testing.assert_allclose(jax.jit(pl_mod.apply)({"params": params}, x),
                                   jax.jit(ref_mod.apply)({"params": params}, x), atol=1e-5)


def test_bad_impl_and_heads_raise_user_errors():
    q, k, v = _qkv(h=4, kvh=3)
    with pytest.raises(UserError, match="multiple"):
        attn_lib.dot_product_attention(q, k, v, impl="xla")
    with pytest.raises(UserError, match="unknown attention impl"):
        attn_lib.dot_product_attention(*_qkv(), impl="flash")
    if jax.default_backend() != "gpu":
        with pytest.raises(UserError, match="needs an NVIDIA GPU"):
            attn_lib.dot_product_attention(*_qkv(), impl="cudnn")
