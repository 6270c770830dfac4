"""Latent diffusion pieces: the autoencoder task, encoding a data set, decoding samples,
and a measured speed / memory profile of a denoiser (pixel or latent) on this machine."""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxcourse.diffusion.schedules import Schedule
from jaxcourse.diffusion.task import diffusion_task, init_key
from jaxcourse.models.autoencoder import Autoencoder
from jaxcourse.models.unet import UNet
from jaxcourse.parallel import memory
from jaxcourse.train import Task, make_optimizer, make_step
from jaxcourse.train.loop import init_state


def autoencoder_task(ae: Autoencoder, latent_penalty: float, latent_noise: float = 0.0) -> Task:
    """Reconstruction MSE + latent_penalty * mean(z^2); batches {"image": [-1, 1] images}.

    latent_noise > 0 decodes z + latent_noise * N(0, 1) while training: the decoder must
    tolerate small latent errors, which is what a diffusion model's samples are (the role
    of the VAE's sampling step in Rombach et al. 2022, with a fixed noise scale)."""

    def init(rng, batch):
        return ae.init(init_key(rng), batch["image"][:1])["params"], {}

    def loss(params, model_state, batch, rng, train):
        z = ae.apply({"params": params}, batch["image"], method=Autoencoder.encode)
        z_in = z
        if train and latent_noise > 0:
            z_in = z + latent_noise * jax.random.normal(rng, z.shape, z.dtype)
        recon = ae.apply({"params": params}, z_in, method=Autoencoder.decode)
        mse = jnp.mean(jnp.square(recon - batch["image"]))
        z_sq = jnp.mean(jnp.square(z))
        return mse + latent_penalty * z_sq, ({"recon_mse": mse, "latent_sq": z_sq}, model_state)

    return Task(init=init, loss=loss)


def encode(ae: Autoencoder, params, images, batch: int = 1024) -> np.ndarray:
    fn = jax.jit(lambda x: ae.apply({"params": params}, x, method=Autoencoder.encode))
    return np.concatenate([np.asarray(fn(jnp.asarray(images[i:i + batch])))
                           for i in range(0, len(images), batch)])


def make_decoder(ae: Autoencoder, params, scale: float):
    """Scaled latents (what the diffusion model samples) -> images in [0, 1]."""
    fn = jax.jit(lambda z: ae.apply({"params": params}, z / scale, method=Autoencoder.decode))

    def decode(z):
        return np.clip((np.asarray(fn(jnp.asarray(z))) + 1.0) / 2.0, 0.0, 1.0)

    return decode


def _timed(fn, args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # warm-up (and, for jit, compile) outside the timing.
    t0 = time.perf_counter()
    for _ in range(repeats):
        jax.block_until_ready(fn(*args))
    return (time.perf_counter() - t0) / repeats


def cost_profile(model: UNet, sched: Schedule, cfg, sample_batch: int, repeats: int = 5) -> dict:
    """Measured train-step and one-denoising-step cost of `model` (random weights).

    train: one optimizer step of the denoising loss on cfg.train.batch_size examples, built
    by the shared loop's `make_step` with cfg's optimizer; sample: one network evaluation on
    `sample_batch` noisy inputs, i.e. one DDIM step. Times are wall-clock means after
    compilation; bytes are XLA's buffer assignment for the compiled program.
    """
    c = model.config
    shape = (c.image_size, c.image_size, c.channels)
    task = diffusion_task(model, sched, "eps", c.num_classes, 0.1)
    n = cfg.train.batch_size
    batch = {"image": jnp.zeros((n,) + shape), "label": jnp.zeros((n,), jnp.int32)}
    tx = make_optimizer(cfg.optimizer, cfg.train.steps)
    state = jax.jit(init_state(task, tx, cfg, batch))(jax.random.PRNGKey(0))
    params = state.params
    train_step = jax.jit(make_step(task, tx, cfg)).lower(state, batch).compile()
    x = jnp.zeros((sample_batch,) + shape)
    t = jnp.zeros((sample_batch,), jnp.int32)
    y = jnp.zeros((sample_batch,), jnp.int32) if c.num_classes else None
    denoise = jax.jit(lambda p, x, t, y: model.apply({"params": p}, x, t, y)).lower(
        params, x, t, y).compile()
    n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
    return {
        "params": n_params,
        "train_ms": 1e3 * _timed(train_step, (state, batch), repeats),
        "sample_step_ms": 1e3 * _timed(denoise, (params, x, t, y), repeats),
        "train_mb": memory.compiled_memory(train_step)["total"] / 2 ** 20,
        "sample_mb": memory.compiled_memory(denoise)["total"] / 2 ** 20,
        "sample_gflops": float(denoise.cost_analysis().get("flops", float("nan"))) / 1e9,
    }
