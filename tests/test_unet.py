"""U-Net: shapes (chex, with and without jit), time embedding, conditioning, input checks."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcourse.errors import UserError
from jaxcourse.models.unet import UNet, UNetConfig, timestep_embedding

TINY = UNetConfig(image_size=8, channels=1, width=8, width_mults=(1, 2), attn_sizes=(4,),
                  heads=2, num_classes=10, groups=4)


def _init(cfg, batch=3):
    x = jnp.zeros((batch, cfg.image_size, cfg.image_size, cfg.channels))
    t = jnp.arange(batch)
    y = jnp.arange(batch) % max(cfg.num_classes, 1) if cfg.num_classes else None
    params = UNet(cfg).init(jax.random.PRNGKey(0), x, t, y)["params"]
    return params, x, t, y


class UNetShapeTest(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    def test_output_shape_matches_input(self):
        for cfg in (TINY,
                    UNetConfig(image_size=12, channels=3, width=8, width_mults=(1, 2, 2),
                               blocks=2, attn_sizes=(3,), heads=2, num_classes=0, groups=4)):
            params, x, t, y = _init(cfg)
            x = jax.random.normal(jax.random.PRNGKey(1), x.shape)
            out = self.variant(lambda p, x, t, y, c=cfg: UNet(c).apply({"params": p}, x, t, y))(
                params, x, t, y)
            chex.assert_shape(out, x.shape)
            chex.assert_tree_all_finite(out)


def test_zero_initialised_output_and_label_dependence():
    """The last conv starts at zero (output 0); once trained-like weights are there, the
    label and the "no label" token give different outputs."""
    params, x, t, y = _init(TINY)
    x = jax.random.normal(jax.random.PRNGKey(1), x.shape)
    model = UNet(TINY)
    np.testing.assert_array_equal(model.apply({"params": params}, x, t, y), 0.0)
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(2), len(leaves))
    noisy = jax.tree.unflatten(tree, [p + 0.1 * jax.random.normal(k, p.shape)
                                      for p, k in zip(leaves, keys)])
    cond = model.apply({"params": noisy}, x, t, y)
    uncond = model.apply({"params": noisy}, x, t, None)  # None -> the null label.
    null = model.apply({"params": noisy}, x, t, jnp.full_like(y, TINY.num_classes))
    np.testing.assert_allclose(uncond, null, rtol=1e-6)
    assert float(jnp.abs(cond - uncond).max()) > 1e-3


def test_timestep_embedding_closed_form():
    emb = timestep_embedding(jnp.array([0.0, 3.0]), 8)
    freqs = np.exp(-np.log(10_000.0) * np.arange(4) / 4)
    want = np.concatenate([np.sin(3.0 * freqs), np.cos(3.0 * freqs)])
    np.testing.assert_allclose(emb[1], want, rtol=1e-5)
    np.testing.assert_allclose(emb[0], [0, 0, 0, 0, 1, 1, 1, 1])


def test_bad_shapes_are_user_errors():
    params, x, t, y = _init(TINY)
    with pytest.raises(UserError, match=r"expects images of shape \[B,8,8,1\]"):
        UNet(TINY).apply({"params": params}, jnp.zeros((2, 16, 16, 1)), t[:2], y[:2])
    with pytest.raises(UserError, match="divisible by 4"):
        UNetConfig(image_size=6, width_mults=(1, 2, 2)).validate()
