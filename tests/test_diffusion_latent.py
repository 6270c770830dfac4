"""Latent diffusion pieces: autoencoder shapes and loss, encode/decode with latent scaling."""
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcourse.diffusion import latent
from jaxcourse.errors import UserError
from jaxcourse.models.autoencoder import Autoencoder, AutoencoderConfig

SMALL = AutoencoderConfig(image_size=8, channels=1, width=8, downsamples=1, latent_channels=2,
                          groups=4)


def test_latent_shapes():
    x = jnp.zeros((5, 8, 8, 1))
    ae = Autoencoder(SMALL)
    variables = jax.eval_shape(ae.init, jax.random.PRNGKey(0), x)
    recon, z = jax.eval_shape(ae.apply, variables, x)
    chex.assert_shape(z, (5, 4, 4, 2))
    chex.assert_shape(recon, (5, 8, 8, 1))
    deep = AutoencoderConfig(image_size=16, channels=3, width=8, downsamples=2,
                             latent_channels=4, groups=4)
    assert deep.latent_size == 4
    v = jax.eval_shape(Autoencoder(deep).init, jax.random.PRNGKey(0), jnp.zeros((2, 16, 16, 3)))
    encode = functools.partial(Autoencoder(deep).apply, method=Autoencoder.encode)
    chex.assert_shape(jax.eval_shape(encode, v, jnp.zeros((2, 16, 16, 3))), (2, 4, 4, 4))


def test_bad_inputs_are_user_errors():
    ae = Autoencoder(SMALL)
    with pytest.raises(UserError, match=r"expects images \[B,8,8,1\]"):
        jax.eval_shape(ae.init, jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 1)))
    with pytest.raises(UserError, match="not divisible"):
        AutoencoderConfig(image_size=6, downsamples=2).validate()


def test_loss_is_reconstruction_plus_latent_penalty_and_decoder_undoes_scale():
    ae = Autoencoder(SMALL)
    x = jax.random.uniform(jax.random.PRNGKey(1), (6, 8, 8, 1)) * 2 - 1
    task = latent.autoencoder_task(ae, latent_penalty=0.5)
    params, _ = jax.jit(task.init)(jax.random.PRNGKey(0), {"image": x})
    loss, (metrics, _) = jax.jit(task.loss, static_argnums=4)(params, {}, {"image": x}, None,
                                                               True)
    recon, z = jax.jit(ae.apply)({"params": params}, x)
    np.testing.assert_allclose(metrics["recon_mse"], jnp.mean((recon - x) ** 2), rtol=1e-5)
    np.testing.assert_allclose(loss, metrics["recon_mse"] + 0.5 * jnp.mean(z ** 2), rtol=1e-5)
    # encode -> scale -> decode (which divides the scale back out) = the autoencoder itself.
    z_np = latent.encode(ae, params, np.asarray(x), batch=4)  # two chunks: 4 + 2.
    np.testing.assert_allclose(z_np, z, atol=1e-5)
    images01 = latent.make_decoder(ae, params, scale=3.0)(z_np * 3.0)
    np.testing.assert_allclose(images01, np.clip((recon + 1) / 2, 0, 1), atol=1e-5)
    # latent_noise: training decodes perturbed latents (rng-dependent); eval decodes z itself.
    noisy = latent.autoencoder_task(ae, latent_penalty=0.5, latent_noise=0.3)
    f = jax.jit(noisy.loss, static_argnums=4)
    l1, l2 = (f(params, {}, {"image": x}, jax.random.PRNGKey(k), True)[0] for k in (1, 2))
    assert l1 != l2 and min(l1, l2) != loss
    np.testing.assert_allclose(f(params, {}, {"image": x}, None, False)[0], loss, rtol=1e-6)
