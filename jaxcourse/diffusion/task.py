"""The denoising objective as a `Task` for the shared training loop.

Loss (Ho et al. 2020, eq. 14, "L_simple"): draw t uniformly, noise x_0 to x_t in closed
form, and regress the network output onto the target (eps or v) with a mean squared error.
Labels are dropped with probability `cond_dropout` for classifier-free guidance.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxcourse.diffusion.guidance import drop_labels
from jaxcourse.diffusion.schedules import Schedule, q_sample, training_target
from jaxcourse.train import Task


def init_key(rng):
    """An "rbg" key derived from `rng`, for initialising conv nets: XLA's RngBitGenerator
    compiles about 2.5x faster on CPU than threefry, whose hash is unrolled once for each of
    the U-Net's ~70 parameter shapes (about 12 s -> 5 s for the smoke U-Net). Deterministic."""
    return jax.random.wrap_key_data(jax.random.bits(rng, (4,), jnp.uint32), impl="rbg")


def loss_weights(abar_B, prediction: str, min_snr: float):
    """Min-SNR-gamma weights (Hang et al. 2023, eq. 8): cap each timestep's weight in
    x_0-error terms at gamma, so the easy low-noise steps stop dominating the gradient.
    Expressed for the eps (weight min(SNR, g) / SNR) or v (min(SNR, g) / (SNR + 1)) loss;
    min_snr = 0 means the plain unweighted loss."""
    if min_snr <= 0:
        return jnp.ones_like(abar_B)
    snr = abar_B / (1.0 - abar_B)
    capped = jnp.minimum(snr, min_snr)
    return capped / snr if prediction == "eps" else capped / (snr + 1.0)


def diffusion_task(model: nn.Module, sched: Schedule, prediction: str = "eps",
                   num_classes: int = 0, cond_dropout: float = 0.1,
                   min_snr: float = 0.0) -> Task:
    """Batches are {"image": [B, H, W, C] in [-1, 1] (or latents), "label": [B] int}."""

    def init(rng, batch):
        x = batch["image"][:1]
        t = jnp.zeros((1,), jnp.int32)
        label = batch["label"][:1] if num_classes else None
        params = model.init({"params": init_key(rng)}, x, t, label)["params"]
        return params, {}

    def loss(params, model_state, batch, rng, train):
        x0 = batch["image"]
        k_t, k_noise, k_drop, k_label = jax.random.split(rng, 4)
        t_B = jax.random.randint(k_t, (x0.shape[0],), 0, sched.steps)
        noise = jax.random.normal(k_noise, x0.shape, x0.dtype)
        x_t = q_sample(sched, x0, t_B, noise)
        labels = None
        if num_classes:
            labels = batch["label"]
            if train:
                labels = drop_labels(k_label, labels, cond_dropout, num_classes)
        out = model.apply({"params": params}, x_t, t_B, labels, train=train,
                          rngs={"dropout": k_drop})
        abar_B = sched.alpha_bars[t_B]
        target = training_target(x0, noise, abar_B, prediction)
        se_B = jnp.mean(jnp.square(out.astype(jnp.float32) - target.astype(jnp.float32)),
                        axis=tuple(range(1, x0.ndim)))
        loss = jnp.mean(loss_weights(abar_B, prediction, min_snr) * se_B)
        return loss, ({"mse": jnp.mean(se_B)}, model_state)

    return Task(init=init, loss=loss)
