"""PPO losses: clipped surrogate, KL penalty, clipped value loss, and the diagnostics.

All functions are top-level and elementwise-then-mean so each can be tested alone.
"""
import jax
import jax.numpy as jnp


def categorical_entropy(logits_BxA):
    logp = jax.nn.log_softmax(logits_BxA)
    return -(jnp.exp(logp) * logp).sum(-1)


def categorical_kl(old_logits_BxA, new_logits_BxA):
    """Exact KL(old || new) between two categorical policies, per row."""
    old_logp = jax.nn.log_softmax(old_logits_BxA)
    new_logp = jax.nn.log_softmax(new_logits_BxA)
    return (jnp.exp(old_logp) * (old_logp - new_logp)).sum(-1)


def clipped_surrogate(log_ratio, advantages, clip_eps):
    """PPO-clip (Schulman et al. 2017, eq. 7) as a loss to minimize:
    -min(r A, clip(r, 1-eps, 1+eps) A). Also returns the fraction of clipped samples."""
    ratio = jnp.exp(log_ratio)
    unclipped = ratio * advantages
    clipped = jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * advantages
    loss = -jnp.minimum(unclipped, clipped).mean()
    clip_frac = (jnp.abs(ratio - 1.0) > clip_eps).astype(jnp.float32).mean()
    return loss, clip_frac


def approx_kl(log_ratio):
    """The low-variance, always non-negative estimator of KL(old||new): E[(r-1) - log r]."""
    return ((jnp.exp(log_ratio) - 1.0) - log_ratio).mean()


def value_loss(values, old_values, targets, clip_eps, clip: bool):
    """0.5 (V - target)^2; with clipping, the pessimistic max against a V kept within
    clip_eps of the value the rollout saw (as in OpenAI baselines' PPO2)."""
    loss = jnp.square(values - targets)
    if clip:
        v_clipped = old_values + jnp.clip(values - old_values, -clip_eps, clip_eps)
        loss = jnp.maximum(loss, jnp.square(v_clipped - targets))
    return 0.5 * loss.mean()


def explained_variance(predictions, targets):
    """1 - Var[target - prediction] / Var[target]: 1 is perfect, 0 is predicting the mean."""
    var = targets.var()
    return jnp.where(var > 0, 1.0 - (targets - predictions).var() / var, 0.0)
