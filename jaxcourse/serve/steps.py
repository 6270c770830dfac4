"""The engine's two compiled device functions: a prompt's prefill into its paged blocks, and
a decode chunk (`steps` tokens for every slot in one `lax.scan`). Pure functions of the model,
its parameters and the block pool; the engine (serve/engine.py) schedules them, and
serve/export.py exports them with `jax.export`."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxcourse.serve import paged_cache
from jaxcourse.serve.sampling import row_keys, sample_rows


def prefill(model, params, pool, tokens_1xT, length, table_M, temperature, top_k, top_p,
             seed):
    """The prompt (padded to T) through the model into its blocks; samples token 0."""
    cache = model.init_cache(1, tokens_1xT.shape[1])
    logits_1xTxV, cache = model.apply({"params": params}, tokens_1xT, cache=cache)
    kv = jax.tree.map(lambda a: a[:, 0], cache["layers"][0])          # [L, T, K, D]
    pool = paged_cache.write_prompt(pool, table_M, length, kv)
    last_V = jax.lax.dynamic_index_in_dim(logits_1xTxV[0], length - 1, keepdims=False)
    key = row_keys(seed[None], jnp.zeros((1,), jnp.int32))
    token = sample_rows(last_V[None], key, temperature[None], top_k[None], top_p[None])[0]
    return pool, token


def decode_chunk(model, steps, params, pool, table_SxM, tokens_S, positions_S, counters_S,
                  limits_S, temperature_S, top_k_S, top_p_S, seeds_S):
    """`steps` tokens for every slot, each from its last token at its own position; slot s
    advances while counters_S[s] < limits_S[s] (tokens generated vs max_tokens), then idles.
    Free slots (limit 0) compute on scratch. Returns (pool, tokens [steps, S])."""
    view = paged_cache.gather(pool, table_SxM)                         # [L, S, P, K, D]
    n_layer = pool["k"].shape[0]
    # The scan carries one slot-major [S, P, K, D] array per layer: carried as the stacked
    # [L, S, ...] view, every step paid a transposed copy of the whole view (measured 2.3x
    # slower at 8 slots).
    layers = [jax.tree.map(lambda a, i=i: a[i], view) for i in range(n_layer)]

    def one(layers_slot, token, position):
        stacked = jax.tree.map(lambda *a: jnp.stack(a)[:, None], *layers_slot)  # [L,1,P,K,D]
        logits, cache = model.apply({"params": params}, token[None, None],
                                    cache={"layers": (stacked,), "index": position})
        new = cache["layers"][0]
        kv = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a[:, 0], position, axis=1,
                                                                 keepdims=False), new)
        return logits[0, 0], [jax.tree.map(lambda a, i=i: a[i, 0], new)
                              for i in range(n_layer)], kv             # kv [L, K, D]

    def step(carry, _):
        layers, tokens_S, positions_S, counters_S = carry
        logits_SxV, layers, kv = jax.vmap(one, out_axes=(0, 0, 1))(layers, tokens_S,
                                                                   positions_S)
        keys = row_keys(seeds_S, counters_S)
        next_S = sample_rows(logits_SxV, keys, temperature_S, top_k_S, top_p_S)
        active_S = counters_S < limits_S
        step_S = active_S.astype(jnp.int32)
        carry = (layers, jnp.where(active_S, next_S, tokens_S), positions_S + step_S,
                 counters_S + step_S)
        return carry, (next_S, kv, positions_S, active_S)

    _, (tokens_KxS, kv, positions_KxS, active_KxS) = jax.lax.scan(
        step, (layers, tokens_S, positions_S, counters_S), length=steps)
    # The chunk's keys / values into the pool in one scatter: (step, slot) pairs as rows.
    n = steps * table_SxM.shape[0]
    kv = jax.tree.map(lambda a: jnp.moveaxis(a, 0, 1).reshape(a.shape[1], n, *a.shape[3:]), kv)
    pool = paged_cache.write_token(pool, jnp.tile(table_SxM, (steps, 1)),
                                   positions_KxS.reshape(n), kv, valid_S=active_KxS.reshape(n))
    return pool, tokens_KxS


prefill_jit = jax.jit(prefill, static_argnums=0, donate_argnums=2)
decode_chunk_jit = jax.jit(decode_chunk, static_argnums=(0, 1), donate_argnums=3)
