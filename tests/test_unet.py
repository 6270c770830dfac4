"""U-Net: shapes (chex), time embedding, zero init, class conditioning, input checks.

One tiny U-Net is initialised and compiled once per module; everything else reuses it or
works on abstract shapes, which keeps this file to a few seconds of compile time.
"""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from jaxcourse.errors import UserError
from jaxcourse.models.unet import UNet, UNetConfig, timestep_embedding

TINY = UNetConfig(image_size=8, channels=1, width=8, width_mults=(1, 2), attn_sizes=(4,),
                  heads=2, num_classes=10, groups=4)


def _inputs(cfg, batch=3):
    x = jax.random.normal(jax.random.PRNGKey(1),
                          (batch, cfg.image_size, cfg.image_size, cfg.channels))
    t = jnp.arange(batch) * 100
    y = jnp.arange(batch) % cfg.num_classes if cfg.num_classes else None
    return x, t, y


@pytest.fixture(scope="module")
def tiny_params():
    x, t, y = _inputs(TINY)
    return jax.jit(UNet(TINY).init)(jax.random.PRNGKey(0), x, t, y)["params"]


@jax.jit
def tiny_apply(params, x, t, y):
    return UNet(TINY).apply({"params": params}, x, t, y)


def test_output_shape_and_zero_initialised_head(tiny_params):
    """Same shape out as in; the last conv starts at zero, so the first output is 0."""
    x, t, y = _inputs(TINY)
    out = tiny_apply(tiny_params, x, t, y)
    chex.assert_shape(out, x.shape)
    np.testing.assert_array_equal(out, 0.0)


def test_label_and_time_change_the_output(tiny_params):
    """With non-degenerate weights, the label (vs the null label) and t both matter."""
    flat, unravel = ravel_pytree(tiny_params)
    params = unravel(flat + 0.1 * jax.random.normal(jax.random.PRNGKey(2), flat.shape))
    x, t, y = _inputs(TINY)
    cond = tiny_apply(params, x, t, y)
    chex.assert_tree_all_finite(cond)
    null = tiny_apply(params, x, t, jnp.full_like(y, TINY.num_classes))
    later = tiny_apply(params, x, t + 1, y)
    assert float(jnp.abs(cond - null).max()) > 1e-3
    assert float(jnp.abs(cond - later).max()) > 1e-5


def test_deeper_rgb_unconditional_shapes():
    """Three levels, two blocks each, RGB, no labels: shapes by abstract evaluation."""
    cfg = UNetConfig(image_size=12, channels=3, width=8, width_mults=(1, 2, 2), blocks=2,
                     attn_sizes=(3,), heads=2, num_classes=0, groups=4)
    x, t, _ = _inputs(cfg, batch=5)
    model = UNet(cfg)
    variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), x, t)
    out = jax.eval_shape(model.apply, variables, x, t)
    chex.assert_shape(out, (5, 12, 12, 3))
    assert "Embed_0" not in variables["params"]  # no class embedding when unconditional.
    # A conditional model called without labels uses the null label (abstractly fine too).
    chex.assert_shape(jax.eval_shape(UNet(TINY).apply, {"params": jax.eval_shape(
        UNet(TINY).init, jax.random.PRNGKey(0), *_inputs(TINY))["params"]},
        _inputs(TINY)[0], _inputs(TINY)[1]), (3, 8, 8, 1))


def test_timestep_embedding_closed_form():
    emb = timestep_embedding(jnp.array([0.0, 3.0]), 8)
    freqs = np.exp(-np.log(10_000.0) * np.arange(4) / 4)
    want = np.concatenate([np.sin(3.0 * freqs), np.cos(3.0 * freqs)])
    np.testing.assert_allclose(emb[1], want, rtol=1e-5)
    np.testing.assert_allclose(emb[0], [0, 0, 0, 0, 1, 1, 1, 1])


def test_bad_shapes_are_user_errors(tiny_params):
    _, t, y = _inputs(TINY)
    with pytest.raises(UserError, match=r"expects images of shape \[B,8,8,1\]"):
        UNet(TINY).apply({"params": tiny_params}, jnp.zeros((2, 16, 16, 1)), t[:2], y[:2])
    with pytest.raises(UserError, match="divisible by 4"):
        UNetConfig(image_size=6, width_mults=(1, 2, 2)).validate()
