"""Mixture-of-experts routing as pure functions: routers, balancing losses, capacity.

Tokens come in groups, x [G, T, D] (G = 1 unless expert parallelism splits them): capacity
and the dispatch order are per group, as in GShard (Lepikhin et al. 2020, section 2.2).

Routers return (weights [G,T,k], experts [G,T,k]):
    top-k token choice   k=1 Switch (Fedus et al. 2021), k=2 GShard / Mixtral. softmax
                         "before": weights are the full softmax's top-k probabilities;
                         "after": the softmax of the k selected logits (Mixtral).
    expert choice        each expert takes its top-C tokens (Zhou et al. 2022): see
                         `expert_choice`.
DeepSeek-V3's auxiliary-loss-free balancing adds a per-expert bias to the scores used for
*selection* only; the gate weights stay the unbiased probabilities.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def load_balancing_loss(router_logits_TxE, top_k: int):
    """Switch / GShard balancing loss E * sum_i f_i * P_i.

    P_i: mean router probability of expert i. f_i: fraction of tokens whose top-k includes
    expert i, counted per token (Mixtral's convention; for k = 1 the Switch paper's eq. 4).
    Uniform routing gives k; every token sent to one expert with probability 1 gives E.
    """
    logits = router_logits_TxE.reshape(-1, router_logits_TxE.shape[-1]).astype(jnp.float32)
    e = logits.shape[-1]
    probs_TxE = jax.nn.softmax(logits, axis=-1)
    _, chosen_TxK = jax.lax.top_k(logits, top_k)
    f_E = jax.nn.one_hot(chosen_TxK, e).sum(axis=1).mean(axis=0)
    return e * jnp.sum(f_E * probs_TxE.mean(axis=0))


def router_z_loss(router_logits_TxE):
    """ST-MoE's router z-loss (Zoph et al. 2022, eq. 5): mean of logsumexp(logits)^2."""
    logits = router_logits_TxE.astype(jnp.float32)
    return jnp.mean(jax.nn.logsumexp(logits, axis=-1) ** 2)


def top_k_route(logits_GxTxE, top_k: int, softmax: str = "before", bias_E=None):
    """Token-choice routing: (weights [G,T,k], experts [G,T,k] int32)."""
    logits = logits_GxTxE.astype(jnp.float32)
    scores = logits if bias_E is None else logits + jax.lax.stop_gradient(bias_E)
    _, experts = jax.lax.top_k(scores, top_k)
    chosen_logits = jnp.take_along_axis(logits, experts, axis=-1)
    if softmax == "after":
        weights = jax.nn.softmax(chosen_logits, axis=-1)
    else:
        weights = jnp.take_along_axis(jax.nn.softmax(logits, axis=-1), experts, axis=-1)
    return weights, experts.astype(jnp.int32)


def capacity(tokens_per_group: int, n_experts: int, top_k: int, factor: float) -> int:
    """Buffer slots per expert and group: ceil(factor * T * k / E); factor <= 0: dropless
    (every token fits even if all pick the same expert)."""
    if factor <= 0:
        return tokens_per_group
    return max(1, min(tokens_per_group, math.ceil(factor * tokens_per_group * top_k / n_experts)))


def dispatch_combine(weights_GxTxK, experts_GxTxK, n_experts: int, cap: int):
    """GShard's one-hot dispatch and combine tensors [G, T, E, C].

    Slots are given first to every token's first choice, then to second choices, ..., each
    in token order; a choice past the expert's capacity is dropped (its token then passes
    through the residual alone). Returns (dispatch bool, combine float, kept [G,T,k] bool).
    """
    g, t, k = experts_GxTxK.shape
    onehot_GxKTxE = jax.nn.one_hot(jnp.swapaxes(experts_GxTxK, 1, 2).reshape(g, k * t),
                                   n_experts, dtype=jnp.int32)
    position_GxKT = jnp.sum((jnp.cumsum(onehot_GxKTxE, axis=1) - 1) * onehot_GxKTxE, axis=-1)
    kept_GxKT = position_GxKT < cap
    slot_GxKTxC = jax.nn.one_hot(jnp.where(kept_GxKT, position_GxKT, cap), cap,
                                 dtype=jnp.float32)  # dropped: an all-zero row
    d_GxKxTxExC = (onehot_GxKTxE[..., None] * slot_GxKTxC[:, :, None, :]).reshape(
        g, k, t, n_experts, cap)
    w_GxKxT = jnp.swapaxes(weights_GxTxK, 1, 2)
    combine = jnp.einsum("gktec,gkt->gtec", d_GxKxTxExC, w_GxKxT)
    dispatch = d_GxKxTxExC.sum(axis=1) > 0
    kept = jnp.swapaxes(kept_GxKT.reshape(g, k, t), 1, 2)
    return dispatch, combine, kept


def expert_choice(logits_GxTxE, cap: int):
    """Expert-choice routing: every expert takes the `cap` tokens that score it highest.

    Returns (dispatch bool, combine float) [G, T, E, C]: balanced by construction, but a
    token may be taken by several experts or by none.
    """
    probs_GxTxE = jax.nn.softmax(logits_GxTxE.astype(jnp.float32), axis=-1)
    gate_GxExC, token_GxExC = jax.lax.top_k(jnp.swapaxes(probs_GxTxE, 1, 2), cap)
    t = logits_GxTxE.shape[1]
    onehot_GxExCxT = jax.nn.one_hot(token_GxExC, t, dtype=jnp.float32)
    dispatch = jnp.transpose(onehot_GxExCxT, (0, 3, 1, 2))
    combine = dispatch * gate_GxExC[:, None]
    return dispatch > 0, combine


def expert_load(experts_GxTxK, n_experts: int):
    """Assignments per expert [E] (before any dropping), summed over groups."""
    return jax.nn.one_hot(experts_GxTxK.reshape(-1), n_experts).sum(axis=0)


def coefficient_of_variation(load_E):
    """std / mean of the per-expert load: 0 when perfectly balanced."""
    return jnp.std(load_E) / jnp.maximum(jnp.mean(load_E), 1e-9)
