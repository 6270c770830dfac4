"""Autoregressive decoding: prefill + one-token steps through the model's own decode state.

    tokens_BxN = generate(model, params, prompt_BxT, rng, max_new_tokens=100,
                          temperature=0.8, top_k=40, top_p=0.95)

`model` is any Flax module with `max_length`, `init_cache(batch, length)` and
`apply({"params": p}, tokens, cache=cache) -> (logits, cache)` (the GPT of transformer.py,
whatever its mixers: each mixer owns its part of the cache, a KV cache for attention, a
fixed-size state for recurrent mixers). The whole loop is one compiled function: prefill
the prompt into the cache, then a `lax.scan` of decode steps.
`use_cache=False` runs the same loop recomputing the full forward pass over the token
buffer every step, the baseline the KV cache is measured against in chapter 3.
Prompts of different lengths: pad them on the right and pass `prompt_lengths_B`; every row
then continues from its own end (attention mixers only: their cache takes a fill level per
row). `prefix_BxPxD` puts embeddings before the prompt (a vision-language model's image).
"""
from __future__ import annotations

import functools
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxcourse.errors import UserError


def sample_logits(logits_BxV, rng, *, temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0):
    """Draws one token per row. temperature 0 is greedy (argmax).

    top_k keeps the k most likely tokens; top_p (nucleus sampling, Holtzman et al. 2020)
    keeps the smallest set of most likely tokens whose probability reaches p. Both filters
    apply to the temperature-scaled distribution, and both always keep the argmax.
    """
    if temperature == 0.0:
        return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    logits = logits_BxV.astype(jnp.float32) / temperature
    neg_inf = jnp.finfo(jnp.float32).min
    if top_k > 0:
        kth_Bx1 = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][:, -1:]
        logits = jnp.where(logits < kth_Bx1, neg_inf, logits)
    if top_p < 1.0:
        sorted_BxV = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_BxV, axis=-1)
        # A token stays if the mass strictly before it is below p; the first always stays.
        keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p
        threshold_Bx1 = jnp.min(jnp.where(keep, sorted_BxV, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold_Bx1, neg_inf, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def check_lengths(model, prompt_len: int, max_new_tokens: int):
    """Clear errors for prompts that cannot be continued within the model context.

    `model`: a model (its `max_length`), a config with `context`, or the length itself."""
    context = getattr(model, "max_length", getattr(model, "context", model))
    if prompt_len < 1:
        raise UserError("the prompt must hold at least one token")
    if prompt_len > context:
        raise UserError(f"prompt has length {prompt_len}, longer than the model context "
                        f"{context}")
    if max_new_tokens < 1 or prompt_len + max_new_tokens > context:
        raise UserError(f"prompt length {prompt_len} + max_new_tokens {max_new_tokens} must "
                        f"fit in the model context {context} (and max_new_tokens >= 1)")


def generate(model: nn.Module, params, prompt_BxT, rng, *, max_new_tokens: int,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, eos_id: int = -1,
             use_cache: bool = True, prefix_BxPxD=None, prompt_lengths_B=None):
    """Samples max_new_tokens continuations; returns the new tokens [B, max_new_tokens].

    rng may be None for greedy decoding (temperature 0).
    After a row emits eos_id (if >= 0) it keeps emitting eos_id. Compiled once per
    (config, shapes, sampling settings).
    `prompt_lengths_B` (host ints, 1..T): row b's prompt is prompt_BxT[b, :length]; what the
    row holds after it is ignored. `prefix_BxPxD`: embeddings the model places before the
    prompt (GPT's `prefix_BxPxD`); both need `use_cache`.
    """
    prompt_BxT = jnp.asarray(prompt_BxT, jnp.int32)
    if prompt_BxT.ndim != 2:
        raise UserError(f"prompt must be [batch, length] token ids, got shape {prompt_BxT.shape}")
    if (prefix_BxPxD is not None or prompt_lengths_B is not None) and not use_cache:
        raise UserError("prefix_BxPxD and prompt_lengths_B need use_cache=True")
    if prompt_lengths_B is not None:
        if hasattr(model, "cfg"):
            model.cfg.require_attention("prompt_lengths_B (a KV-cache fill level per row)")
        lengths_B = np.asarray(prompt_lengths_B)
        if lengths_B.shape != prompt_BxT.shape[:1] or not (
                (lengths_B >= 1) & (lengths_B <= prompt_BxT.shape[1])).all():
            raise UserError(f"prompt_lengths_B must be [{prompt_BxT.shape[0]}] ints in 1.."
                            f"{prompt_BxT.shape[1]}, got {lengths_B.tolist()}")
        prompt_BxT = prompt_BxT[:, :int(lengths_B.max())]  # the columns some row reads
        prompt_lengths_B = jnp.asarray(lengths_B, jnp.int32)
    n_prefix = 0 if prefix_BxPxD is None else prefix_BxPxD.shape[1]
    check_lengths(model, n_prefix + prompt_BxT.shape[1], max_new_tokens)
    if rng is None:
        if temperature != 0.0:
            raise UserError("sampling with temperature > 0 needs an rng key")
        rng = jax.random.key(0)  # Greedy decoding ignores it.
    sampling = (float(temperature), int(top_k), float(top_p), int(eos_id))
    return _generate(model, sampling, max_new_tokens, use_cache, nn.meta.unbox(params),
                     prompt_BxT, rng, prefix_BxPxD, prompt_lengths_B)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _generate(model, sampling, max_new_tokens, use_cache, params, prompt_BxT, rng,
              prefix_BxPxD=None, lengths_B=None):
    temperature, top_k, top_p, eos_id = sampling
    sample = functools.partial(sample_logits, temperature=temperature, top_k=top_k,
                               top_p=top_p)
    b, t = prompt_BxT.shape
    total = t + max_new_tokens + (0 if prefix_BxPxD is None else prefix_BxPxD.shape[1])
    if use_cache:
        state, logits_BxV = prefill(model, params, prompt_BxT, total,
                                    prefix_BxPxD=prefix_BxPxD, lengths_B=lengths_B)
        step_fn = functools.partial(cached_step, model, params)
    else:
        state, logits_BxV = _recompute_prefill(model, params, prompt_BxT, total)
        step_fn = functools.partial(_recompute_step, model, params)
    keys = jax.random.split(rng, max_new_tokens)
    first_B = sample(logits_BxV, keys[0])
    done_B = first_B == eos_id

    def body(carry, key):
        state, token_B, done_B = carry
        state, logits_BxV = step_fn(state, token_B)
        nxt_B = sample(logits_BxV, key)
        nxt_B = jnp.where(done_B, eos_id, nxt_B) if eos_id >= 0 else nxt_B
        return (state, nxt_B, done_B | (nxt_B == eos_id)), nxt_B

    _, rest_NxB = jax.lax.scan(body, (state, first_B, done_B), keys[1:])
    return jnp.concatenate([first_B[:, None], rest_NxB.T], axis=1)


def time_generate(model: nn.Module, params, batch: int, prompt_len: int, new_tokens: int,
                  use_cache: bool, repeats: int = 3):
    """Best-of-`repeats` seconds of one compiled greedy `generate` call, and its tokens.

    The prompt is random tokens; the first (compiling) call is not timed.
    """
    prompt = jax.random.randint(jax.random.key(1), (batch, prompt_len), 0, model.cfg.vocab_size)

    def run():
        return jax.block_until_ready(generate(model, params, prompt, None, temperature=0.0,
                                              max_new_tokens=new_tokens, use_cache=use_cache))

    out = run()
    times = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times), out


def prefill(model: nn.Module, params, prompt_BxT, cache_len: int = 0, *, prefix_BxPxD=None,
            lengths_B=None):
    """Runs the prompt (after `prefix_BxPxD`, if given) through the model into a fresh cache;
    returns (cache, the logits of the last prompt token). With `lengths_B` row b ends at
    its own length: the cache's fill level becomes per row, and what it holds past a row's
    end is never attended (causal) and overwritten by the tokens decoded next."""
    cache = model.init_cache(prompt_BxT.shape[0], cache_len)
    extra = {} if prefix_BxPxD is None else {"prefix_BxPxD": prefix_BxPxD}
    logits_BxTxV, cache = model.apply({"params": params}, prompt_BxT, cache=cache, **extra)
    if lengths_B is None:
        return cache, logits_BxTxV[:, -1]
    ends_B = logits_BxTxV.shape[1] - prompt_BxT.shape[1] + lengths_B
    cache = {**cache, "index": ends_B.astype(jnp.int32)}
    return cache, logits_BxTxV[jnp.arange(ends_B.shape[0]), ends_B - 1]


def cached_step(model: nn.Module, params, cache, token_B):
    """Appends one token per row to the cache; returns (cache, its next-token logits)."""
    logits_Bx1xV, cache = model.apply({"params": params}, token_B[:, None], cache=cache)
    return cache, logits_Bx1xV[:, 0]


def _recompute_prefill(model, params, prompt_BxT, total):
    # The state is a fixed-size token buffer and the fill level; causal attention makes the
    # zeros after the fill level irrelevant to the logits read at fill level - 1.
    b, t = prompt_BxT.shape
    buffer_BxN = jnp.zeros((b, total), jnp.int32).at[:, :t].set(prompt_BxT)
    logits = model.apply({"params": params}, buffer_BxN)
    return (buffer_BxN, jnp.int32(t)), logits[:, t - 1]


def _recompute_step(model, params, state, token_B):
    buffer_BxN, filled = state
    buffer_BxN = jax.lax.dynamic_update_slice_in_dim(buffer_BxN, token_B[:, None], filled, 1)
    logits_BxNxV = model.apply({"params": params}, buffer_BxN)
    last_BxV = jax.lax.dynamic_index_in_dim(logits_BxNxV, filled, axis=1, keepdims=False)
    return (buffer_BxN, filled + 1), last_BxV
