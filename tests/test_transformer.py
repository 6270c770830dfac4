"""GPT / encoder / encoder-decoder: causality, shapes, layer scan, remat, axis names, config."""
import dataclasses

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxcourse.errors import UserError
from jaxcourse.models.encoder_decoder import Encoder, EncoderDecoder
from jaxcourse.lm import lm_loss
from jaxcourse.models.transformer import GPT, GPTConfig, gpt_config, model_section

TINY = GPTConfig(vocab_size=13, context=16, n_layer=2, n_head=4, n_kv_head=2, d_model=32,
                 attention="xla")


def _tokens(b=2, t=16, seed=0, vocab=13):
    return np.random.default_rng(seed).integers(0, vocab, (b, t), dtype=np.int32)


def _apply_on_embeddings(model, params, emb_BxTxD, *args):
    """Runs a model with its token-embedding output replaced by emb_BxTxD."""
    def interceptor(next_fun, call_args, kwargs, context):
        if context.module.name == "embed" and context.method_name == "__call__":
            return emb_BxTxD
        return next_fun(*call_args, **kwargs)
    with nn.intercept_methods(interceptor):
        return model.apply({"params": params}, jnp.zeros(emb_BxTxD.shape[:2], jnp.int32),
                           *args)


def _influence(model, t_out, *args, b=2, t=16, d=32):
    """Per input position: |d out[:, t_out] / d embedding[:, s]| summed over batch, width.

    Initialization and the gradient share one compiled program (compiles dominate here).
    """
    emb = np.random.default_rng(2).standard_normal((b, t, d), np.float32)

    @jax.jit
    def grad_fn(emb_BxTxD):
        params = model.init(jax.random.key(1), _tokens(b, t), *args)["params"]
        return jax.grad(lambda e: _apply_on_embeddings(model, params, e, *args)[:, t_out].sum())(
            emb_BxTxD)

    return np.abs(np.asarray(grad_fn(emb))).sum(axis=(0, 2))


@pytest.mark.parametrize("kw", [dict(pos="rope"),
                                dict(pos="learned", norm_position="post", norm="layernorm",
                                     window=4, attention="einsum")])
def test_gpt_is_causal_through_gradients(kw):
    cfg = dataclasses.replace(TINY, **kw)
    influence_T = _influence(GPT(cfg), 9)
    assert np.all(influence_T[10:] == 0), influence_T  # nothing from the future
    if not cfg.window:
        assert np.all(influence_T[:10] > 0), influence_T
    else:  # Two windowed layers reach back 2 * (W - 1) positions and no further.
        reach = 9 - 2 * (cfg.window - 1)
        assert np.all(influence_T[:reach] == 0) and np.all(influence_T[reach:10] > 0)


def test_encoder_is_bidirectional_and_ignores_padding():
    valid = np.ones((2, 16), bool)
    valid[:, 12:] = False
    influence_T = _influence(Encoder(TINY), 3, valid)
    assert np.all(influence_T[:12] > 0), influence_T  # sees the future too
    # Padding keys get no attention, so nothing flows from them into real positions.
    assert np.all(influence_T[12:] == 0), influence_T


def test_encoder_decoder_shapes():
    cfg = dataclasses.replace(TINY, pos="sinusoidal", norm="layernorm", bias=True,
                              tie_embeddings=False, dropout=0.1)
    model = EncoderDecoder(cfg)
    src, tgt = _tokens(t=12), _tokens(t=7, seed=1)
    src_valid = np.ones((2, 12), bool)
    src_valid[0, 9:] = False
    src2 = src.copy()  # The same source with different tokens under the padding.
    src2[0, 9:] = (src[0, 9:] + 1) % cfg.vocab_size

    @jax.jit  # One compiled program: init, then a second pass on src2.
    def run():
        rngs = {"params": jax.random.key(1), "dropout": jax.random.key(3)}
        logits, variables = model.init_with_output(rngs, src, tgt, src_valid, train=True)
        logits2 = model.apply(variables, src2, tgt, src_valid, train=True,
                              rngs={"dropout": rngs["dropout"]})
        return logits, logits2, nn.meta.unbox(variables["params"])

    logits, logits2, params = run()
    chex.assert_shape(logits, (2, 7, cfg.vocab_size))
    chex.assert_tree_all_finite(logits)
    chex.assert_shape(params["decoder"]["layer_0"]["cross_attention"]["key"]["kernel"],
                      (32, 2, 8))
    hidden = jax.eval_shape(Encoder(cfg).apply, {"params": params["encoder"]}, src, src_valid)
    chex.assert_shape(hidden, (2, 12, 32))
    # Source padding never changes the output (same dropout key, so same masks).
    np.testing.assert_allclose(logits2, logits, atol=1e-6)


def test_scanned_rematerialized_layers_match_the_loop():
    tokens = _tokens()
    loop = GPT(TINY)
    scanned = GPT(dataclasses.replace(TINY, scan_layers=True, remat="dots_saveable"))

    def loss(model, p):
        return lm_loss(model.apply({"params": p}, tokens[:, :-1]), tokens[:, 1:])[0]

    @jax.jit  # One compiled program for init and both gradients.
    def run():
        params = nn.meta.unbox(loop.init(jax.random.key(1), tokens)["params"])
        blocks = [params["blocks"][f"layer_{i}"] for i in range(TINY.n_layer)]
        stacked = dict(params, blocks={"layers": jax.tree.map(lambda *a: jnp.stack(a),
                                                              *blocks)})
        return (jax.value_and_grad(lambda p: loss(loop, p))(params),
                jax.value_and_grad(lambda p: loss(scanned, p))(stacked))

    (ref_loss, ref_grads), (val, grads) = run()
    np.testing.assert_allclose(val, ref_loss, rtol=1e-6)
    layers = grads["blocks"]["layers"]
    grads = dict(grads, blocks={f"layer_{i}": jax.tree.map(lambda a: a[i], layers)
                                for i in range(TINY.n_layer)})
    chex.assert_trees_all_close(grads, ref_grads, atol=1e-5)


def test_bf16_matmuls_are_bf16_products_with_f32_gradients():
    """matmul="bfloat16": forward and both backward products take bf16 operands, accumulate
    in f32, and hand back gradients in the parameters' and inputs' own dtypes."""
    from jaxcourse.models.layers import bf16_dot_general

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 5, 8)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(8, 3, 4)), jnp.float32)
    dims = (((2,), (0,)), ((), ()))
    rounded = lambda a: a.astype(jnp.bfloat16).astype(jnp.float32)  # noqa: E731
    want = jnp.einsum("btk,khd->bthd", rounded(x), rounded(w))
    f = lambda x, w: bf16_dot_general(x, w, dims)  # noqa: E731
    np.testing.assert_allclose(f(x, w), want, rtol=1e-6)
    g = jnp.asarray(rng.normal(size=(2, 5, 3, 4)), jnp.float32)
    dx, dw = jax.vjp(f, x, w)[1](g)
    assert dx.dtype == jnp.float32 and dw.dtype == jnp.float32
    np.testing.assert_allclose(dx, jnp.einsum("bthd,khd->btk", rounded(g), rounded(w)),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw, jnp.einsum("btk,bthd->khd", rounded(x), rounded(g)),
                               rtol=1e-5, atol=1e-5)
    # A contraction it does not handle falls back to lax.dot_general unchanged.
    batch_dims = (((2,), (1,)), ((0,), (0,)))
    y = jnp.asarray(rng.normal(size=(2, 8, 6)), jnp.float32)
    np.testing.assert_array_equal(bf16_dot_general(x, y, batch_dims),
                                  jax.lax.dot_general(x, y, batch_dims))
    # The whole model: same parameters, logits within bf16 rounding of the float32 model.
    tokens = _tokens()
    params = GPT(TINY).init(jax.random.key(0), tokens)["params"]
    ref = GPT(TINY).apply({"params": params}, tokens)
    out = GPT(dataclasses.replace(TINY, matmul="bfloat16")).apply({"params": params}, tokens)
    assert out.dtype == jnp.float32 and not np.array_equal(out, ref)
    np.testing.assert_allclose(out, ref, atol=0.05)


@pytest.mark.parametrize("m,k", [(96, 128), (96, 7)])
def test_bf16_matmul_backward_compiles_to_bf16_dots(m, k):
    """The speed of matmul="bfloat16" on CPU rests on XLA keeping all three products of a
    training step in bf16: a bf16 dot that contracts the leading axis of its lhs is run in
    float32 instead (`_unfoldable_transpose` in layers.py avoids that). Checks the compiled
    gradient: every dot takes bf16 operands, and the values match the f32 reference."""
    if jax.default_backend() != "cpu":
        pytest.skip("a property of XLA's CPU compiler")
    from jaxcourse.models.layers import bf16_dot_general

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(m, k)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(k, 64)), jnp.float32)
    dims = (((1,), (0,)), ((), ()))
    loss = lambda x, w: jnp.sum(jnp.tanh(bf16_dot_general(x, w, dims)))  # noqa: E731
    grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
    hlo = grad.lower(x, w).compile().as_text()
    dot_inputs = [line for comp in hlo.split("\n\n") if " dot(" in comp
                  for line in comp.splitlines() if "parameter(" in line]
    assert len(dot_inputs) >= 6 and all(" bf16[" in line for line in dot_inputs), dot_inputs
    ref = jax.grad(lambda x, w: jnp.sum(jnp.tanh(x @ w)), argnums=(0, 1))(x, w)
    for got, want in zip(grad(x, w), ref):
        np.testing.assert_allclose(got, want, atol=0.05 * float(jnp.max(jnp.abs(want))))


def test_auto_matmul_follows_the_cpu_flags():
    """matmul="auto" is bf16 exactly where the hardware multiplies bf16 natively: an AMD EPYC
    without AVX512-BF16 ran the bf16 preset 1.4x slower than f32 (BENCHMARKS.md)."""
    from jaxcourse.models.layers import bf16_dot_general, cpu_multiplies_bf16, native_bf16_matmul

    zen3 = "processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512bw\n"
    assert not cpu_multiplies_bf16(zen3)
    assert cpu_multiplies_bf16(zen3.replace("avx512bw", "avx512bw avx512_bf16"))
    assert cpu_multiplies_bf16(zen3.replace("avx512bw", "amx_tile amx_bf16"))
    assert cpu_multiplies_bf16("Features\t: fp asimd bf16 i8mm\n")  # Arm (Graviton 3)
    auto = dataclasses.replace(TINY, matmul="auto").dot_general
    assert auto is (bf16_dot_general if native_bf16_matmul() else None)
    assert dataclasses.replace(TINY, matmul="bfloat16").dot_general is bf16_dot_general
    with pytest.raises(UserError, match="matmul"):
        dataclasses.replace(TINY, matmul="fp8")


def test_parameters_carry_logical_axis_names():
    tokens = _tokens()
    for cfg, path in [(TINY, ("blocks", "layer_0")),
                      (dataclasses.replace(TINY, scan_layers=True), ("blocks", "layers"))]:
        specs = nn.get_partition_spec(
            jax.eval_shape(GPT(cfg).init, jax.random.key(0), tokens))["params"]
        block = specs[path[0]][path[1]]
        lead = ("layers",) if cfg.scan_layers else ()
        assert block["attention"]["query"]["kernel"] == P(*lead, "embed", "heads", "head_dim")
        assert block["attention"]["key"]["kernel"] == P(*lead, "embed", "kv_heads", "head_dim")
        assert block["attention"]["out"]["kernel"] == P(*lead, "heads", "head_dim", "embed")
        assert block["mlp"]["up"]["kernel"] == P(*lead, "embed", "mlp")
        assert block["mlp"]["down"]["kernel"] == P(*lead, "mlp", "embed")
        assert specs["embed"]["embedding"] == P("vocab", "embed")


def test_lm_loss_closed_form():
    logits = jnp.log(jnp.array([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]]]))
    loss, metrics = lm_loss(logits, jnp.array([[0, 2]]))
    assert float(loss) == pytest.approx(-(np.log(0.5) + np.log(0.1)) / 2, rel=1e-6)
    assert float(metrics["accuracy"]) == pytest.approx(0.5)
    masked, _ = lm_loss(logits, jnp.array([[0, 2]]), jnp.array([[1, 0]]))
    assert float(masked) == pytest.approx(-np.log(0.5), rel=1e-6)


def test_config_section_round_trip_and_errors():
    section = model_section(vocab_size=65, n_layer=3)
    cfg = gpt_config(section)
    assert cfg.vocab_size == 65 and cfg.n_layer == 3 and cfg.kv_heads == cfg.n_head
    assert cfg.ff_dim == 4 * cfg.d_model
    with pytest.raises(UserError, match="unknown model config keys: n_layers"):
        gpt_config({"n_layers": 2})
    with pytest.raises(UserError, match="norm_position"):
        GPTConfig(norm_position="middle")
    with pytest.raises(UserError, match="not a multiple"):
        GPTConfig(n_head=4, n_kv_head=3)
    with pytest.raises(UserError, match="remat"):
        GPTConfig(remat="everything")
    with pytest.raises(UserError, match="longer than the model context 16"):
        GPT(TINY).init(jax.random.key(0), _tokens(t=17))
