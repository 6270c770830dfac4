"""Per-row sampling settings: `models/decode.sample_logits` with its settings as arrays.

`sample_logits` takes temperature / top-k / top-p as Python numbers (one compiled sampler
per setting). A serving step holds requests with different settings in one batch and must
not recompile when a new one arrives, so here every setting is a [S] array and every filter
is applied by masking rather than by Python branches. The semantics are the same, row by
row: temperature 0 is greedy; top-k keeps the k most likely tokens (ties with the k-th
kept); top-p keeps the smallest most-likely set whose mass reaches p, applied after top-k;
both always keep the argmax. tests/test_serve_engine.py holds it to sample_logits.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def row_keys(seeds_S, counters_S):
    """The key of token `counter` of the request seeded `seed`: fold_in(key(seed), counter),
    so a request's samples do not depend on which slot or batch it ran in."""
    return jax.vmap(lambda s, c: jax.random.fold_in(jax.random.key(s), c))(seeds_S, counters_S)


def sample_rows(logits_SxV, keys_S, temperature_S, top_k_S, top_p_S):
    """One token per row, each row with its own key and settings ([S] arrays). A batch of
    greedy rows only skips the sorts and draws (the same tokens: _sample_one's argmax)."""
    return jax.lax.cond(
        jnp.any(temperature_S > 0),
        lambda: jax.vmap(_sample_one)(logits_SxV, keys_S, temperature_S, top_k_S, top_p_S),
        lambda: jnp.argmax(logits_SxV, axis=-1).astype(jnp.int32))


def filtered_logits(logits_V, temperature, top_k, top_p):
    """The temperature-scaled logits with top-k / top-p masked to float32 min (one row)."""
    v = logits_V.shape[-1]
    neg_inf = jnp.finfo(jnp.float32).min
    logits = logits_V.astype(jnp.float32) / jnp.where(temperature > 0, temperature, 1.0)
    kth = jnp.sort(logits)[::-1][jnp.clip(top_k - 1, 0, v - 1)]
    logits = jnp.where((top_k > 0) & (logits < kth), neg_inf, logits)
    sorted_V = jnp.sort(logits)[::-1]
    probs_V = jax.nn.softmax(sorted_V)
    keep_V = (jnp.cumsum(probs_V) - probs_V) < top_p  # the mass strictly before a token
    threshold = jnp.min(jnp.where(keep_V, sorted_V, jnp.inf))
    return jnp.where((top_p < 1.0) & (logits < threshold), neg_inf, logits)


def token_probs(logits_V, temperature, top_k, top_p):
    """The distribution `_sample_one` draws from: softmax of the filtered logits, or the
    one-hot argmax at temperature 0 (what speculative decoding's rejection rule compares)."""
    greedy = jax.nn.one_hot(jnp.argmax(logits_V, axis=-1), logits_V.shape[-1])
    probs = jax.nn.softmax(filtered_logits(logits_V, temperature, top_k, top_p))
    return jnp.where(temperature > 0, probs, greedy)


def _sample_one(logits_V, key, temperature, top_k, top_p):
    logits = filtered_logits(logits_V, temperature, top_k, top_p)
    # [1, V] as sample_logits draws it, so one key gives the same token in both.
    drawn = jax.random.categorical(key, logits[None], axis=-1)[0]
    greedy = jnp.argmax(logits_V, axis=-1)
    return jnp.where(temperature > 0, drawn, greedy).astype(jnp.int32)
