"""What decoding one more token costs at a given context: the decode state's bytes and the
milliseconds of a cached step.

The cache is made by the model itself (`GPT.init_cache`: a KV cache for attention, fixed-size
states for recurrent mixers) and its fill level set to the context, so the step costs what it
would after a prompt of that length; no prompt is run (a 16k-token prefill through attention
is the expensive part we are not measuring). The cache holds zeros, and speed does not depend
on the weights either (trained or random).
"""
from __future__ import annotations

import dataclasses
import functools
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxcourse.models import decode
from jaxcourse.models.transformer import GPT, GPTConfig


def state_bytes(model_cfg: GPTConfig, context: int, batch_size: int = 1) -> int:
    """Bytes of the decode state after `context` tokens (every layer, fill level included);
    shapes only, nothing allocated."""
    cfg = dataclasses.replace(model_cfg, context=max(model_cfg.context, context))
    shapes = jax.eval_shape(lambda: GPT(cfg).init_cache(batch_size, context))
    return int(sum(np.prod(x.shape, dtype=np.int64) * x.dtype.itemsize
                   for x in jax.tree.leaves(shapes)))


def decode_params(model_cfg: GPTConfig, seed: int = 0):
    """Random parameters of the model (shapes do not depend on the context with RoPE or no
    positions; learned position tables get the decode config's length)."""
    return nn.meta.unbox(jax.jit(lambda r: GPT(model_cfg).init(
        r, jnp.zeros((1, 1), jnp.int32)))(jax.random.key(seed))["params"])


def decode_ms_per_token(model_cfg: GPTConfig, contexts, *, params=None, new_tokens: int = 8,
                        batch_size: int = 1, repeats: int = 3, seed: int = 0) -> list[float]:
    """Best-of-`repeats` milliseconds per token of `new_tokens` greedy cached steps (one
    compiled `lax.scan`), starting from a cache filled to each context. `params`: trained
    parameters to time (used where their shapes fit the longer context: not with learned
    position tables); None or unfit: random ones."""
    longest = max(contexts) + new_tokens
    cfg = dataclasses.replace(model_cfg, context=max(model_cfg.context, longest))
    model = GPT(cfg)
    if params is None or cfg.pos == "learned":
        params = decode_params(cfg, seed)
    out = []
    for context in contexts:
        cache = model.init_cache(batch_size, context + new_tokens)
        cache["index"] = jnp.asarray(context, jnp.int32)
        token_B = jnp.zeros((batch_size,), jnp.int32)
        jax.block_until_ready(_steps(model, new_tokens, params, cache, token_B))  # compile
        times = []
        for _ in range(max(1, repeats)):
            start = time.perf_counter()
            jax.block_until_ready(_steps(model, new_tokens, params, cache, token_B))
            times.append(time.perf_counter() - start)
        out.append(1000.0 * min(times) / new_tokens)
    return out


@functools.partial(jax.jit, static_argnums=(0, 1))
def _steps(model, n, params, cache, token_B):
    def body(carry, _):
        cache, token_B = carry
        cache, logits_BxV = decode.cached_step(model, params, cache, token_B)
        return (cache, jnp.argmax(logits_BxV, -1).astype(jnp.int32)), None

    (cache, token_B), _ = jax.lax.scan(body, (cache, token_B), None, length=n)
    return token_B
