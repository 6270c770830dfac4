"""KV-cache decoding equals the full forward pass; sampling filters; length errors."""
import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcourse.errors import UserError
from jaxcourse.models import decode
from jaxcourse.models.transformer import GPT, GPTConfig

TINY = GPTConfig(vocab_size=13, context=16, n_layer=2, n_head=4, n_kv_head=2, d_model=32,
                 attention="xla")


@functools.lru_cache
def _params(cfg, seed=1):
    params = jax.jit(GPT(cfg).init)(jax.random.key(seed), np.zeros((1, 4), np.int32))
    params = nn.meta.unbox(params["params"])
    # A unit-scale embedding makes the logits O(1), so 1e-5 is a real tolerance.
    emb = np.random.default_rng(seed).standard_normal(params["embed"]["embedding"].shape,
                                                      np.float32)
    return dict(params, embed={"embedding": emb})


@pytest.mark.parametrize("kw", [
    dict(),  # RoPE, GQA, pre-LN RMSNorm, XLA attention
    dict(pos="learned", window=5, n_kv_head=1, attention="einsum", norm_position="post",
         norm="layernorm", bias=True, scan_layers=True),
])
def test_kv_cache_decode_matches_full_forward(kw):
    cfg = dataclasses.replace(TINY, **kw)
    params = _params(cfg)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 16), dtype=np.int32)
    full = jax.jit(lambda p, t: GPT(cfg).apply({"params": p}, t))(params, tokens)
    prefill = jax.jit(functools.partial(decode.prefill, GPT(cfg)), static_argnums=2)
    step = jax.jit(functools.partial(decode.cached_step, GPT(cfg)))
    cache, last = prefill(params, tokens[:, :6], 0)
    got = [last]
    for t in range(6, 15):
        cache, last = step(params, cache, tokens[:, t])
        got.append(last)
    got = np.stack(got, axis=1)  # logits predicting positions 6..15
    assert np.abs(full).max() > 1.0  # the tolerance below is meaningful
    np.testing.assert_allclose(got, full[:, 5:15], atol=1e-5, rtol=0)
    assert int(cache["index"]) == 15


def test_generate_with_cache_equals_recompute():
    params = _params(TINY)
    prompt = np.random.default_rng(3).integers(0, TINY.vocab_size, (3, 4), dtype=np.int32)
    model = GPT(TINY)
    settings = dict(temperature=0.9, top_k=5, top_p=0.9)
    outs = [decode.generate(model, params, prompt, jax.random.key(4), max_new_tokens=12,
                            use_cache=use_cache, **settings) for use_cache in (True, False)]
    assert outs[0].shape == (3, 12)
    np.testing.assert_array_equal(outs[0], outs[1])
    # Greedy decoding is the argmax of the full forward pass at every step.
    greedy = decode.generate(model, params, prompt, None, max_new_tokens=12, temperature=0.0)
    seq = jnp.concatenate([prompt, greedy], axis=1)
    full = jax.jit(model.apply)({"params": params}, seq)
    np.testing.assert_array_equal(jnp.argmax(full[:, 3:-1], -1), greedy)


def test_eos_is_sticky():
    params = _params(TINY)
    prompt = np.random.default_rng(3).integers(0, TINY.vocab_size, (3, 4), dtype=np.int32)
    # Same shapes and settings as the greedy run above: the compiled loop is reused.
    free = np.asarray(decode.generate(GPT(TINY), params, prompt, None, max_new_tokens=12,
                                      temperature=0.0))
    eos = int(free[0, 2])
    out = np.asarray(decode.generate(GPT(TINY), params, prompt, None, max_new_tokens=12,
                                     temperature=0.0, eos_id=eos))
    for row_free, row in zip(free, out):
        hits = np.flatnonzero(row_free == eos)
        first = hits[0] if len(hits) else len(row)
        np.testing.assert_array_equal(row[:first + 1], row_free[:first + 1])
        assert np.all(row[first:] == eos)


PROBS = np.array([0.5, 0.3, 0.15, 0.05])


def _frequencies(n=40_000, **settings):
    logits = jnp.broadcast_to(jnp.log(jnp.asarray(PROBS)), (n, 4))
    draws = jax.jit(functools.partial(decode.sample_logits, **settings))(
        logits, jax.random.key(7))
    return np.bincount(np.asarray(draws), minlength=4) / n


@pytest.mark.parametrize("settings,expected", [
    (dict(), PROBS),
    (dict(temperature=2.0), np.sqrt(PROBS) / np.sqrt(PROBS).sum()),
    (dict(top_k=2), np.array([0.5, 0.3, 0, 0]) / 0.8),
    (dict(top_p=0.7), np.array([0.5, 0.3, 0, 0]) / 0.8),   # 0.5 < 0.7 <= 0.8
    (dict(top_p=0.85), np.array([0.5, 0.3, 0.15, 0]) / 0.95),
    (dict(top_k=3, top_p=0.6), np.array([0.5, 0.3, 0, 0]) / 0.8),
])
def test_sampling_frequencies(settings, expected):
    freq = _frequencies(**settings)
    np.testing.assert_allclose(freq, expected, atol=0.012)
    assert np.all(freq[expected == 0] == 0)  # filtered tokens never appear


def test_greedy_and_degenerate_filters_are_argmax():
    logits = np.random.default_rng(8).standard_normal((64, 10), np.float32)
    argmax = np.argmax(logits, -1)
    key = jax.random.key(9)
    for settings in [dict(temperature=0.0), dict(top_k=1), dict(top_p=1e-6)]:
        sample = jax.jit(functools.partial(decode.sample_logits, **settings))
        np.testing.assert_array_equal(sample(logits, key), argmax)


def test_length_errors_are_clear():
    params, model = {}, GPT(TINY)  # Lengths are checked before the model ever runs.
    with pytest.raises(UserError, match="prompt has length 17, longer than the model context 16"):
        decode.generate(model, params, jnp.zeros((1, 17), jnp.int32), None, max_new_tokens=1)
    with pytest.raises(UserError, match="must fit in the model context 16"):
        decode.generate(model, params, jnp.zeros((1, 10), jnp.int32), None, max_new_tokens=7)
    with pytest.raises(UserError, match=r"\[batch, length\]"):
        decode.generate(model, params, jnp.zeros((10,), jnp.int32), None, max_new_tokens=2)


def test_per_row_prompt_lengths_and_prefix():
    """Rows of different prompt lengths in one batch continue exactly as each alone; a prefix
    of the prompt's own embeddings is the same as those tokens in the prompt."""
    params, model = _params(TINY), GPT(TINY)
    rng = np.random.default_rng(5)
    rows = [rng.integers(0, TINY.vocab_size, n, dtype=np.int32) for n in (3, 7, 5)]
    padded = np.full((3, 9), 11, np.int32)  # junk after each row's end
    for i, r in enumerate(rows):
        padded[i, :len(r)] = r
    got = decode.generate(model, params, padded, None, max_new_tokens=6, temperature=0.0,
                          prompt_lengths_B=[len(r) for r in rows])
    for i, r in enumerate(rows):
        alone = decode.generate(model, params, r[None], None, max_new_tokens=6, temperature=0.0)
        np.testing.assert_array_equal(got[i], alone[0])
    head, tail = padded[:, :2], padded[:, 2:]
    prefix = jnp.asarray(params["embed"]["embedding"])[head]
    with_prefix = decode.generate(model, params, tail, None, max_new_tokens=6,
                                  temperature=0.0, prefix_BxPxD=prefix,
                                  prompt_lengths_B=[len(r) - 2 for r in rows])
    np.testing.assert_array_equal(with_prefix, got)


def test_per_row_lengths_errors():
    model = GPT(TINY)
    prompt = jnp.zeros((2, 4), jnp.int32)
    with pytest.raises(UserError, match=r"prompt_lengths_B must be \[2\] ints in 1..4"):
        decode.generate(model, {}, prompt, None, max_new_tokens=2, prompt_lengths_B=[0, 4])
    with pytest.raises(UserError, match="need use_cache=True"):
        decode.generate(model, {}, prompt, None, max_new_tokens=2, prompt_lengths_B=[1, 4],
                        use_cache=False)
    rnn = GPT(dataclasses.replace(TINY, mixer="rwkv"))
    with pytest.raises(UserError, match="needs attention mixers"):
        decode.generate(rnn, {}, prompt, None, max_new_tokens=2, prompt_lengths_B=[1, 4])
