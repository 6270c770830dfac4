"""The engine's two compiled device functions: a prompt's prefill into its paged blocks, and
a decode chunk (`steps` tokens for every slot in one `lax.scan`). Pure functions of the model,
its parameters and the block pool; the engine (serve/engine.py) schedules them, and
serve/export.py exports them with `jax.export`."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxcourse.serve import paged_cache
from jaxcourse.serve.sampling import row_keys, sample_rows


def prefill(model, params, pool, tokens_BxT, lengths_B, tables_BxM, temperature_B, top_k_B,
            top_p_B, seeds_B):
    """B prompts (each padded to T on the right) through the model into their blocks;
    samples each one's token 0. Rows of length 0 are padding (written to scratch)."""
    cache = model.init_cache(tokens_BxT.shape[0], tokens_BxT.shape[1])
    logits_BxTxV, cache = model.apply({"params": params}, tokens_BxT, cache=cache)
    kv = jax.tree.map(lambda a: jnp.swapaxes(a, 2, 3), cache["layers"][0])  # [L,B,T,K,D]
    pool = paged_cache.write_prompt(pool, tables_BxM, lengths_B, kv)
    last_BxV = jnp.take_along_axis(logits_BxTxV, jnp.maximum(lengths_B - 1, 0)[:, None, None],
                                   axis=1)[:, 0]
    keys = row_keys(seeds_B, jnp.zeros_like(seeds_B))
    return pool, sample_rows(last_BxV, keys, temperature_B, top_k_B, top_p_B)


def decode_chunk(model, steps, params, pool, table_SxM, tokens_S, positions_S, counters_S,
                  limits_S, temperature_S, top_k_S, top_p_S, seeds_S):
    """`steps` tokens for every slot, each from its last token at its own position; slot s
    advances while counters_S[s] < limits_S[s] (tokens generated vs max_tokens), then idles.
    Free slots (limit 0) compute on scratch. Returns (pool, tokens [steps, S])."""
    n_layer, s = len(pool["k"]), table_SxM.shape[0]
    # The slots are the model's batch, each row at its own fill level (an index of shape
    # [S]). The scan carries one [S, K, P, D] cache per layer, a list, not stacked: the
    # model then writes each step's one new row per slot in place. vmapping the model over
    # slots instead stacked and sliced every layer's cache each step, copying all of it
    # (54 ms per step at 32 slots).
    if model.cfg.scan_layers:  # nn.scan over layers takes the stacked form (copies)
        layers = paged_cache.gather(pool, table_SxM)                  # [L, S, K, P, D]
    else:
        layers = [paged_cache.gather_layer(pool, table_SxM, i) for i in range(n_layer)]

    def step(carry, _):
        layers, tokens_S, positions_S, counters_S = carry
        logits_Sx1xV, cache = model.apply({"params": params}, tokens_S[:, None],
                                          cache={"layers": (layers,), "index": positions_S})
        keys = row_keys(seeds_S, counters_S)
        next_S = sample_rows(logits_Sx1xV[:, 0], keys, temperature_S, top_k_S, top_p_S)
        active_S = counters_S < limits_S
        step_S = active_S.astype(jnp.int32)
        carry = (cache["layers"][0], jnp.where(active_S, next_S, tokens_S),
                 positions_S + step_S, counters_S + step_S)
        return carry, (next_S, positions_S, active_S)

    (layers, *_), (tokens_KxS, positions_KxS, active_KxS) = jax.lax.scan(
        step, (layers, tokens_S, positions_S, counters_S), length=steps)
    # The chunk's keys / values, read from the dense view at the positions written, into
    # the pool in one scatter: (step, slot) pairs as rows.
    rows_KxS = jnp.broadcast_to(jnp.arange(s), positions_KxS.shape)
    if not isinstance(layers, list):
        layers = [jax.tree.map(lambda a, i=i: a[i], layers) for i in range(n_layer)]
    kv = jax.tree.map(lambda *a: jnp.stack(a), *[  # [L, steps, S, K, D]
        jax.tree.map(lambda a: a[rows_KxS, :, positions_KxS], layer) for layer in layers])
    n = steps * s
    kv = jax.tree.map(lambda a: a.reshape(n_layer, n, *a.shape[3:]), kv)
    pool = paged_cache.write_token(pool, jnp.tile(table_SxM, (steps, 1)),
                                   positions_KxS.reshape(n), kv, valid_S=active_KxS.reshape(n))
    return pool, tokens_KxS


prefill_jit = jax.jit(prefill, static_argnums=0, donate_argnums=2)
decode_chunk_jit = jax.jit(decode_chunk, static_argnums=(0, 1), donate_argnums=3)
