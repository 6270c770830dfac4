"""Speculative decoding (Leviathan et al. 2023, "Fast Inference from Transformers via
Speculative Decoding"; Chen et al. 2023, "Accelerating LLM Decoding with Speculative
Sampling").

    tokens_N, stats = speculative_generate(target, t_params, draft, d_params, prompt_T,
                                           rng, max_new_tokens=64, gamma=4, temperature=0.0)

Each round the draft proposes `gamma` tokens autoregressively from its own KV cache, the
target scores all gamma + 1 positions in one call from its KV cache, and the rejection rule
(Leviathan et al., algorithm 1) keeps a prefix: draft token x_i is accepted with probability
min(1, p_i(x_i) / q_i(x_i)); at the first rejection one token is drawn from
norm(max(0, p_i - q_i)); if all gamma are accepted, a bonus token is drawn from p_gamma. So a
round emits 1 .. gamma + 1 tokens, each distributed exactly as the target's sampler would
draw it (tests/test_speculative.py measures it). p and q are `serve.sampling.token_probs`:
the one sampler's distribution after temperature / top-k / top-p, one-hot at temperature 0,
where the rule reduces to "accept while the draft's argmax is the target's" and the output
is the target's greedy output.

Rolling back a KV cache is moving its fill level: the rejected positions stay in the buffers
past `index`, hidden by the causal mask and overwritten by the next round. The draft cache
is rolled back one position further and each round starts by feeding the draft the last two
tokens, so a fully accepted round (whose last draft token the draft never saw) needs no
extra draft call and every call has a static shape. The whole loop is one compiled
`lax.while_loop` (batch 1): the CPU pays no Python dispatch per token in either mode.
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxcourse.errors import UserError
from jaxcourse.models import decode
from jaxcourse.serve.sampling import token_probs


def speculative_generate(target: nn.Module, target_params, draft: nn.Module, draft_params,
                         prompt_T, rng, *, max_new_tokens: int, gamma: int = 4,
                         temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0):
    """max_new_tokens tokens continuing prompt_T ([T] ids) and stats {"rounds", "drafted",
    "accepted"} (device scalars; acceptance rate = accepted / drafted). rng may be None for
    greedy decoding. The two models share the vocabulary; compiled once per
    (models, shapes, gamma): the sampling settings are traced, as in the engine."""
    prompt_T = jnp.asarray(prompt_T, jnp.int32)
    if prompt_T.ndim != 1:
        raise UserError(f"prompt must be [length] token ids, got shape {prompt_T.shape}")
    if gamma < 1:
        raise UserError(f"gamma must be >= 1, got {gamma}")
    if target.cfg.vocab_size != draft.cfg.vocab_size:
        raise UserError(f"draft vocabulary {draft.cfg.vocab_size} != target vocabulary "
                        f"{target.cfg.vocab_size}")
    # The target's last round may write gamma positions past the last token kept.
    for model in (target, draft):
        decode.check_lengths(model, prompt_T.shape[0], max_new_tokens + gamma)
    if rng is None:
        if temperature != 0.0:
            raise UserError("sampling with temperature > 0 needs an rng key")
        rng = jax.random.key(0)
    sampling = (jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p))
    return _speculative(target, draft, max_new_tokens, gamma, nn.meta.unbox(target_params),
                        nn.meta.unbox(draft_params), prompt_T, rng, sampling)


def accept_draft(p_GxV, q_GxV, drafts_G, key):
    """The rejection rule of one round. p_GxV: target distributions at the gamma + 1
    positions (row i is the next-token distribution after draft token i, row 0 after the
    last kept token); q_GxV: the draft's [gamma, V] distributions its tokens drafts_G were
    drawn from. Returns (tokens [gamma + 1]: the accepted drafts then the corrected or bonus
    token, the rest padding; n_accepted)."""
    gamma = drafts_G.shape[0]
    k_accept, k_fix = jax.random.split(key)
    p_x = jnp.take_along_axis(p_GxV[:gamma], drafts_G[:, None], axis=1)[:, 0]
    q_x = jnp.take_along_axis(q_GxV, drafts_G[:, None], axis=1)[:, 0]
    u = jax.random.uniform(k_accept, (gamma,))
    ok = u * q_x < p_x                       # u < p / q without dividing by q = 0
    n = jnp.argmin(jnp.append(ok, False))    # leading accepts
    q_n = jnp.concatenate([q_GxV, jnp.zeros_like(q_GxV[:1])])[n]   # q after gamma: none
    residual = jnp.maximum(p_GxV[n] - q_n, 0.0)
    # p == q leaves no residual mass (a rejection then has probability 0): fall back to p.
    residual = jnp.where(residual.sum() > 0, residual, p_GxV[n])
    fix = jax.random.categorical(k_fix, jnp.log(residual))
    tokens = jnp.where(jnp.arange(gamma + 1) < n, jnp.append(drafts_G, 0), 0)
    return tokens.at[n].set(fix).astype(jnp.int32), n


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _speculative(target, draft, max_new, gamma, t_params, d_params, prompt_T, rng, sampling):
    probs = jax.vmap(lambda lg: token_probs(lg, *sampling))
    t = prompt_T.shape[0]
    length = t + max_new + gamma
    t_cache, t_last = decode.prefill(target, t_params, prompt_T[None], length)
    d_cache, _ = decode.prefill(draft, d_params, prompt_T[None], length)
    rng, k0 = jax.random.split(rng)
    first = jax.random.categorical(k0, jnp.log(probs(t_last))[0]).astype(jnp.int32)
    out = jnp.zeros(max_new + gamma + 1, jnp.int32).at[0].set(first)
    d_cache = dict(d_cache, index=jnp.int32(t - 1))   # the draft re-reads the prompt's last

    def propose(d_cache, prev, last, key):
        """gamma draft tokens and their distributions, starting from [prev, last]."""
        keys = jax.random.split(key, gamma)
        logits, d_cache = draft.apply({"params": d_params}, jnp.stack([prev, last])[None],
                                      cache=d_cache)
        q = probs(logits[:, -1])[0]
        x = jax.random.categorical(keys[0], jnp.log(q)).astype(jnp.int32)

        def step(carry, k):
            d_cache, x = carry
            logits, d_cache = draft.apply({"params": d_params}, x[None, None], cache=d_cache)
            q = probs(logits[:, -1])[0]
            nxt = jax.random.categorical(k, jnp.log(q)).astype(jnp.int32)
            return (d_cache, nxt), (nxt, q)

        (d_cache, _), (xs, qs) = jax.lax.scan(step, (d_cache, x), keys[1:])
        return d_cache, jnp.concatenate([x[None], xs]), jnp.concatenate([q[None], qs])

    def body(c):
        t_cache, d_cache, out, count, prev, last, rng, stats = c
        rng, k_draft, k_accept = jax.random.split(rng, 3)
        n0 = t_cache["index"]                   # position of `last`, not yet in the target
        d_cache, drafts_G, q_GxV = propose(d_cache, prev, last, k_draft)
        logits, t_cache = target.apply({"params": t_params},
                                       jnp.concatenate([last[None], drafts_G])[None],
                                       cache=t_cache)
        tokens, n = accept_draft(probs(logits[0]), q_GxV, drafts_G, k_accept)
        out = jax.lax.dynamic_update_slice(out, tokens, (count,))
        seq = jnp.concatenate([last[None], tokens])   # positions n0 .. n0 + gamma + 1
        new_last, new_prev = seq[n + 1], seq[n]
        t_cache = dict(t_cache, index=n0 + n + 1)     # roll back the rejected positions
        d_cache = dict(d_cache, index=n0 + n)         # one further: it re-reads new_prev
        stats = {"rounds": stats["rounds"] + 1, "drafted": stats["drafted"] + gamma,
                 "accepted": stats["accepted"] + n}
        return t_cache, d_cache, out, count + n + 1, new_prev, new_last, rng, stats

    zero = jnp.int32(0)
    init = (t_cache, d_cache, out, jnp.int32(1), prompt_T[-1], first, rng,
            {"rounds": zero, "drafted": zero, "accepted": zero})
    _, _, out, _, _, _, _, stats = jax.lax.while_loop(lambda c: c[3] < max_new, body, init)
    return out[:max_new], stats
