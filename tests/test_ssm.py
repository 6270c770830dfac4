"""State-space mixers: the selective-scan implementations, SSD, S4D's two modes, and every
SSM mixer decoding from its fixed-size state exactly as the full forward pass computes."""
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxcourse.errors import UserError
from jaxcourse.models import decode, ssm, ssm_scan
from jaxcourse.lm import lm_loss
from jaxcourse.lm.params import abstract_params, count_params
from jaxcourse.models.transformer import GPT, GPTConfig, gpt_config, model_section

TOL = dict(rtol=1e-5, atol=1e-5)
TINY = dict(vocab_size=11, context=24, n_layer=2, n_head=2, d_model=16)
MIXER_OPTIONS = {"s4d": {"d_state": 8}, "mamba": {"d_state": 4, "chunk": 4},
                 "mamba2": {"d_state": 4, "head_dim": 8, "chunk": 4}}


def _rand(rng, *shape, scale=1.0):
    return jnp.asarray(rng.normal(size=shape) * scale, jnp.float32)


def _scan_inputs(groups, b=2, l=13, d=6, n=4, seed=0):
    rng = np.random.default_rng(seed)
    bc = (b, l, n) if groups == 0 else (b, l, groups, n)
    return dict(u=_rand(rng, b, l, d), delta=_rand(rng, b, l, d, scale=0.5),
                A=-jnp.exp(_rand(rng, d, n, scale=0.5)), B=_rand(rng, *bc), C=_rand(rng, *bc),
                D=_rand(rng, d), z=_rand(rng, b, l, d), delta_bias=_rand(rng, d, scale=0.3))


def _ref_channels_first(u, delta, A, B, C, D, z, delta_bias):
    """selective_scan_ref's loop (delta_softplus=True), written over numpy in its own
    channels-first layout: u, delta, z [b, d, l]; B, C [b, n, l] or [b, g, n, l]."""
    delta = np.log1p(np.exp(delta + delta_bias[:, None]))
    b, d, l = u.shape
    if B.ndim == 4:
        B = np.repeat(B, d // B.shape[1], axis=1)
        C = np.repeat(C, d // C.shape[1], axis=1)
    else:
        B, C = B[:, None], C[:, None]
    x = np.zeros((b, d, A.shape[1]))
    ys = []
    for i in range(l):
        x = np.exp(delta[:, :, i, None] * A) * x + (delta[:, :, i] * u[:, :, i])[..., None] \
            * B[..., i]
        ys.append((x * C[..., i]).sum(-1))
    y = np.stack(ys, axis=2) + u * D[:, None]
    return y * (z / (1 + np.exp(-z))), x


@pytest.mark.parametrize("groups", [0, 2])
def test_selective_scan_computes_the_reference_function_channels_last(groups):
    kw = _scan_inputs(groups)
    y, last = ssm.selective_scan(**kw, delta_softplus=True, return_last_state=True,
                                 impl="sequential")
    time_axis = ("u", "delta", "z", "B", "C")
    to_first = {k: np.moveaxis(np.asarray(v, np.float64), 1, -1) if k in time_axis
                else np.asarray(v, np.float64) for k, v in kw.items()}
    y_ref, last_ref = _ref_channels_first(**to_first)
    np.testing.assert_allclose(y, np.moveaxis(y_ref, -1, 1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(last, last_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("groups", [0, 2])
def test_selective_scan_impls_agree_in_values_and_gradients(groups):
    kw = _scan_inputs(groups)
    diff = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")

    def run(impl):
        def loss(args):
            y, last = ssm.selective_scan(**args, delta_softplus=True,
                                         return_last_state=True, impl=impl, chunk=4)
            return jnp.sum(jnp.sin(y)) + jnp.sum(last ** 2), (y, last)  # 13 = 3 x 4 + 1

        (_, (y, last)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(
            {k: kw[k] for k in diff})
        return y, last, grads

    ref = run("sequential")
    for impl in ("associative", "chunked", "analytic"):
        got = run(impl)
        np.testing.assert_allclose(got[0], ref[0], **TOL)
        np.testing.assert_allclose(got[1], ref[1], **TOL)
        for name in diff:
            np.testing.assert_allclose(got[2][name], ref[2][name], **TOL, err_msg=name)


def test_selective_scan_continues_from_a_state():
    kw = _scan_inputs(0, l=10)
    whole = ssm.selective_scan(**kw, return_last_state=True)
    first = {k: (v[:, :6] if v.ndim == 3 else v) for k, v in kw.items()}
    rest = {k: (v[:, 6:] if v.ndim == 3 else v) for k, v in kw.items()}
    y1, h = ssm.selective_scan(**first, return_last_state=True)
    y2, last = ssm.selective_scan(**rest, return_last_state=True, initial_state=h)
    np.testing.assert_allclose(jnp.concatenate([y1, y2], 1), whole[0], **TOL)
    np.testing.assert_allclose(last, whole[1], **TOL)


@pytest.mark.parametrize("groups,l", [(1, 16), (2, 21)])
def test_ssd_chunked_equals_the_recurrence(groups, l):
    rng = np.random.default_rng(1)
    b, h, p, n = 2, 4, 3, 5
    X, A = _rand(rng, b, l, h, p), -jnp.exp(_rand(rng, b, l, h, scale=0.5))
    B, C = _rand(rng, b, l, groups, n), _rand(rng, b, l, groups, n)
    S0 = _rand(rng, b, h, p, n)

    def loss(f, X, A, B, C, S0):
        Y, S = f(X, A, B, C, S0)
        return jnp.sum(jnp.sin(Y)) + jnp.sum(S ** 2), (Y, S)

    chunked = jax.jit(jax.value_and_grad(
        lambda *a: loss(lambda *x: ssm.ssd(*x[:4], 8, initial_states=x[4]), *a),
        argnums=(0, 1, 2, 3, 4), has_aux=True))
    plain = jax.jit(jax.value_and_grad(
        lambda *a: loss(lambda *x: ssm_scan.ssd_reference(*x[:4], x[4]), *a),
        argnums=(0, 1, 2, 3, 4), has_aux=True))
    (_, got), g_got = chunked(X, A, B, C, S0)
    (_, ref), g_ref = plain(X, A, B, C, S0)
    for a, r in zip(got + g_got, ref + g_ref, strict=True):
        np.testing.assert_allclose(a, r, rtol=1e-5, atol=2e-5)


def test_s4d_convolution_mode_equals_recurrent_mode():
    rng = np.random.default_rng(2)
    h, n2, t = 3, 4, 40
    dt = jnp.exp(jnp.asarray(rng.uniform(np.log(1e-3), np.log(1e-1), h), jnp.float32))
    A = -0.5 + 1j * jnp.pi * jnp.arange(n2) * jnp.ones((h, 1))
    C = jnp.asarray(rng.normal(size=(h, n2)) + 1j * rng.normal(size=(h, n2)), jnp.complex64)
    u = _rand(rng, 2, t, h)
    conv = ssm.s4d_conv(u, ssm.s4d_kernel(dt, A, C, t))
    rec, _ = ssm.s4d_recurrent(u, dt, A, C, jnp.zeros((2, h, n2), jnp.complex64))
    np.testing.assert_allclose(conv, rec, rtol=1e-4, atol=2e-5)
    assert float(jnp.abs(rec).max()) > 0.05  # a real signal, not two zeros


def test_s4d_convolution_gradient_of_a_layer_stack_finishes_on_cpu():
    """The FFT form that ran the input's and the kernel's rfft apart hung XLA:CPU's thread
    pool here (ssm.s4d_conv): the gradient of 3 layers never returned on 2 cores."""
    code = """if True:
        import jax, jax.numpy as jnp
        from jaxcourse.models.ssm import s4d_conv
        def loss(ks, u):
            for k in ks:
                u = jnp.tanh(s4d_conv(u, k)) + u
            return u.mean()
        ks = [0.01 * jax.random.normal(jax.random.key(i), (384, 256)) for i in range(3)]
        u = jax.random.normal(jax.random.key(3), (64, 256, 384))
        grad = jax.jit(jax.grad(loss))
        for _ in range(3):
            g = jax.block_until_ready(grad(ks, u))
        print(all(bool(jnp.isfinite(x).all()) for x in g), min(float(jnp.abs(x).max()) for x in g))
    """
    env = {**os.environ, "XLA_FLAGS": ""}
    try:
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                              text=True, timeout=120, check=False)
    except subprocess.TimeoutExpired:
        pytest.fail("the S4D convolution's gradient hung for 120 s")
    assert done.returncode == 0, done.stderr[-2000:]
    finite, smallest_max = done.stdout.split()
    assert finite == "True" and float(smallest_max) > 1e-6  # every layer's kernel gets a gradient


def init_params(cfg, seed=0):
    init = jax.jit(lambda key: GPT(cfg).init(key, jnp.zeros((1, 4), jnp.int32))["params"])
    return nn.meta.unbox(init(jax.random.key(seed)))


def decodes_like_the_full_forward(cfg, prompt=5, total=10, seed=0):
    """prefill + cached_step logits == the full forward's, from caches whose size does not
    depend on the context (every non-attention mixer)."""
    model = GPT(cfg)
    params = init_params(cfg, seed)
    tokens = np.random.default_rng(seed).integers(0, cfg.vocab_size, (2, total), np.int32)
    full = jax.jit(lambda p, x: model.apply({"params": p}, x))(params, tokens)
    cache, last = jax.jit(lambda p, x: decode.prefill(model, p, x, total))(
        params, tokens[:, :prompt])
    step = jax.jit(lambda p, c, x: decode.cached_step(model, p, c, x))  # compiled once
    steps = [last]
    for t in range(prompt, total - 1):
        cache, last = step(params, cache, tokens[:, t])
        steps.append(last)
    np.testing.assert_allclose(np.stack(steps, 1), full[:, prompt - 1:total - 1], atol=1e-5)
    assert float(jnp.std(full)) > 1e-3
    return params


def state_shapes(cfg, kind):
    small = GPT(cfg).init_cache(2, 8)["layers"][cfg.pattern.index(kind)]
    large = GPT(cfg).init_cache(2, cfg.context)["layers"][cfg.pattern.index(kind)]
    return jax.tree.map(jnp.shape, small), jax.tree.map(jnp.shape, large)


@pytest.mark.parametrize("mixer", ["s4d", "mamba", "mamba2"])
def test_ssm_mixer_decodes_from_a_constant_size_state(mixer):
    cfg = GPTConfig(**dict(TINY, n_layer=1), mixer=mixer,
                    options={mixer: MIXER_OPTIONS[mixer]})
    decodes_like_the_full_forward(cfg)
    small, large = state_shapes(cfg, mixer)
    assert small == large


@pytest.mark.parametrize("scan", [False, True])
def test_attention_mamba_hybrid_decodes_with_and_without_scan_layers(scan):
    # scanned: two repeats of the pattern stacked; looped: one repeat
    cfg = GPTConfig(**dict(TINY, n_layer=4 if scan else 2), layer_pattern="attention,mamba",
                    scan_layers=scan,
                    options={"mamba": MIXER_OPTIONS["mamba"]})
    params = decodes_like_the_full_forward(cfg)
    blocks = params["blocks"]
    if scan:
        assert blocks["layers"]["layer_1"]["mamba"]["A_log"].shape == (2, 32, 4)
    else:
        assert "attention" in blocks["layer_0"] and "mamba" in blocks["layer_1"]


def test_mamba_lm_learns_a_cycle():
    cfg = GPTConfig(**dict(TINY, n_layer=1), mixer="mamba",
                    options={"mamba": MIXER_OPTIONS["mamba"]})
    model = GPT(cfg)
    params = init_params(cfg)
    data = np.tile(np.arange(11, dtype=np.int32), 3)[None, :21]
    tx = optax.adam(2e-2)

    @jax.jit
    def step(p, opt):
        loss, g = jax.value_and_grad(
            lambda p: lm_loss(model.apply({"params": p}, data[:, :-1]), data[:, 1:])[0])(p)
        updates, opt = tx.update(g, opt, p)
        return optax.apply_updates(p, updates), opt, loss

    opt, losses = tx.init(params), []
    for _ in range(30):
        params, opt, loss = step(params, opt)
        losses.append(float(loss))
    assert losses[-1] < 0.3 * losses[0], losses


@pytest.mark.parametrize("mixer,key,value,match", [
    ("mamba", "d_state", 0, r"model.mamba.d_state=0 must be a positive integer"),
    ("mamba2", "d_state", -1, r"model.mamba2.d_state=-1 must be a positive integer"),
    ("s4d", "d_state", 0, r"model.s4d.d_state=0 must be a positive integer"),
    ("mamba", "chunk", 12, r"model.mamba.chunk=12 must be a positive power of two"),
    ("mamba2", "chunk", 6, r"model.mamba2.chunk=6 must be a positive power of two"),
    ("mamba", "scan", "fft", r"model.mamba.scan='fft' is not one of sequential"),
])
def test_bad_ssm_options_are_one_line_errors_naming_the_key(mixer, key, value, match):
    section = model_section(mixer=mixer)
    section[mixer][key] = value
    with pytest.raises(UserError, match=match) as err:
        gpt_config(section)
    assert "\n" not in str(err.value)


def test_bad_scan_inputs_are_one_line_errors():
    kw = _scan_inputs(0)
    with pytest.raises(UserError, match="must be a positive integer"):
        ssm.selective_scan(kw["u"], kw["delta"], jnp.zeros((6, 0)), kw["B"][..., :0],
                           kw["C"][..., :0])
    with pytest.raises(UserError, match="impl='pallas9' is not one of"):
        ssm.selective_scan(kw["u"], kw["delta"], kw["A"], kw["B"], kw["C"], impl="pallas9")
    x = jnp.zeros((1, 8, 2, 3))
    with pytest.raises(UserError, match="chunk=12 must be a positive power of two"):
        ssm.ssd(x, jnp.zeros((1, 8, 2)), jnp.zeros((1, 8, 1, 4)), jnp.zeros((1, 8, 1, 4)), 12)


def test_ffn_none_gives_the_mamba_lm_blocks_mixer_only():
    """model.ffn="none": blocks are x + mamba(norm(x)) only, the Mamba LM of the paper (and of
    mamba.py, which benchmarks/mamba_train.py trains side by side): its parameter count."""
    v, d, n, layers = 65, 128, 16, 4
    cfg = GPTConfig(vocab_size=v, context=64, n_layer=layers, d_model=d, mixer="mamba",
                    ffn="none", pos="none", tie_embeddings=False)
    params = abstract_params(cfg)
    assert set(params["blocks"]["layer_0"]) == {"mamba", "mamba_norm"}
    e, r, k = 2 * d, d // 16, 4  # expand 2, dt_rank ceil(d / 16), conv width 4
    per_layer = (d + d * 2 * e + k * e + e + e * (r + 2 * n) + r * e + e + e * n + e
                 + e * d)
    assert count_params(params) == v * d + layers * per_layer + d + d * v
    logits = jax.eval_shape(lambda p: GPT(cfg).apply({"params": p}, jnp.zeros((2, 8), int)),
                            params)  # traced, not compiled
    assert logits.shape == (2, 8, v)
