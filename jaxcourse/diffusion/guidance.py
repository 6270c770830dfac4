"""Classifier-free guidance (Ho & Salimans 2022).

Training drops the label with probability p (the "null" label, index num_classes), so one
network learns both eps(x, t, y) and eps(x, t). Sampling extrapolates between them:

    eps_w = eps(x, t) + w * (eps(x, t, y) - eps(x, t))

w = 0 is the unconditional model, w = 1 the conditional one, w > 1 trades diversity for
class fidelity. The same linear mix applies to a v-prediction output (v is linear in eps
for fixed x_t).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

# apply_fn(x_t [B,...], t [B], labels [B]) -> output [B,...]
ApplyFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def drop_labels(rng, labels_B, p: float, null_label: int):
    """Replaces each label by the null label with probability p (training-time dropout)."""
    if p <= 0:
        return labels_B
    return jnp.where(jax.random.bernoulli(rng, p, labels_B.shape), null_label, labels_B)


def guided_model_fn(apply_fn: ApplyFn, labels_B, scale, null_label: int):
    """model_fn(x, t) for the samplers, guided towards `labels_B` with strength `scale`.

    A Python scale of exactly 0 or 1 needs only one network call; any other scale (or a
    traced array) runs conditional and unconditional halves as one batch of 2B.
    """
    null_B = jnp.full_like(labels_B, null_label)
    if isinstance(scale, (int, float)) and scale in (0, 1):
        labels = labels_B if scale == 1 else null_B
        return lambda x, t_B: apply_fn(x, t_B, labels)

    def model_fn(x, t_B):
        both = apply_fn(jnp.concatenate([x, x]), jnp.concatenate([t_B, t_B]),
                        jnp.concatenate([labels_B, null_B]))
        cond, uncond = jnp.split(both, 2)
        return uncond + scale * (cond - uncond)

    return model_fn
