"""MAE: masking counts and indices, the normalised target, masked-only loss, the decoder sees
what the encoder saw (visible patches only), reconstruction images, one task step."""
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcourse.errors import UserError
from jaxcourse.vision import mae as M


class TinyPatchEncoder(nn.Module):
    """Stand-in for the ViT: patch embedding + learned positions, drop to `keep`, a class
    token, one MLP layer. Returns {"tokens": [B, 1 + K, D]}."""
    patch_size: int = 4
    d: int = 16

    @nn.compact
    def __call__(self, images, *, train=False, keep_BxK=None):
        x = nn.Dense(self.d)(M.patchify(images, self.patch_size))
        x = x + self.param("pos", nn.initializers.normal(0.02), x.shape[1:])[None]
        if keep_BxK is not None:
            x = jnp.take_along_axis(x, keep_BxK[..., None], axis=1)
        cls = jnp.broadcast_to(self.param("cls", nn.initializers.zeros, (1, 1, self.d)),
                               (x.shape[0], 1, self.d))
        x = jnp.concatenate([cls, x], axis=1)
        return {"tokens": x + nn.Dense(self.d)(nn.gelu(x))}


def test_random_masking_counts_and_indices():
    n = 16
    for ratio in (0.0, 0.5, 0.75, 0.9):
        m = jax.tree.map(np.asarray, M.random_masking(jax.random.key(1), 6, n, ratio))
        k = n - round(ratio * n)
        chex.assert_shape([m["keep"], m["restore"], m["mask"]], [(6, k), (6, n), (6, n)])
        np.testing.assert_array_equal(m["mask"].sum(1), round(ratio * n))
        for i in range(6):  # kept indices are exactly the visible (mask 0) positions
            assert sorted(m["keep"][i]) == list(np.flatnonzero(m["mask"][i] == 0))
    m = jax.tree.map(np.asarray, M.random_masking(jax.random.key(2), 4, n, 0.75))
    assert len({tuple(r) for r in m["mask"]}) == 4  # per-example shuffles
    # restore inverts the shuffle: shuffled order gathered with restore is raster order
    shuffle = np.argsort(m["restore"], axis=1)
    np.testing.assert_array_equal(shuffle[:, :4], m["keep"])
    x = np.broadcast_to(np.arange(n) * 10, (4, n))
    np.testing.assert_array_equal(
        np.take_along_axis(np.take_along_axis(x, shuffle, 1), m["restore"], 1), x)
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(UserError, match=r"must be in \[0, 1\)"):
            M.random_masking(jax.random.key(0), 2, n, bad)
    with pytest.raises(UserError, match="no visible patch"):
        M.random_masking(jax.random.key(0), 2, 4, 0.9)
    with pytest.raises(UserError, match=r"must be in \[0, 1\)"):
        M.MAEConfig(mask_ratio=1.0)


def test_normalized_target_and_masked_only_loss():
    patch = jnp.array([[[1.0, 2.0, 3.0, 6.0]]])  # mean 3, var 3.5
    np.testing.assert_allclose(M.normalized_targets(patch),
                               (patch - 3.0) / np.sqrt(3.5 + 1e-6), rtol=1e-6)
    rng = jax.random.key(3)
    t = M.normalized_targets(jax.random.normal(rng, (2, 5, 12)))
    np.testing.assert_allclose(t.mean(-1), 0.0, atol=1e-5)
    np.testing.assert_allclose(t.var(-1), 1.0, atol=1e-4)
    pred = jnp.zeros((2, 5, 12))
    mask = jnp.array([[1, 0, 0, 1, 0], [0, 0, 1, 0, 0]], jnp.float32)
    want = np.mean([np.mean(np.asarray(t[i, j]) ** 2) for i, j in [(0, 0), (0, 3), (1, 2)]])
    np.testing.assert_allclose(M.mae_loss(pred, t, mask), want, rtol=1e-5)
    noisy = pred.at[0, 1].set(100.0).at[1, 4].set(-7.0)  # visible patches: ignored
    np.testing.assert_allclose(M.mae_loss(noisy, t, mask), want, rtol=1e-5)


def test_patchify_roundtrip_and_reconstruction_images():
    cfg = M.MAEConfig(patch_size=2)
    img = jax.random.uniform(jax.random.key(4), (2, 4, 6, 3))
    patches = M.patchify(img, 2)
    chex.assert_shape(patches, (2, 6, 12))
    np.testing.assert_array_equal(patches[0, 1], img[0, 0:2, 2:4].reshape(-1))
    np.testing.assert_array_equal(M.unpatchify(patches, 2, 4, 6, 3), img)
    m = M.random_masking(jax.random.key(5), 2, 6, 0.5)
    rec = M.reconstruction(img, M.targets(img, cfg), m["mask"], cfg)  # a perfect prediction
    np.testing.assert_allclose(rec["pasted"], img, atol=1e-5)
    np.testing.assert_allclose(rec["prediction"], img, atol=1e-5)
    hidden = M.unpatchify(jnp.broadcast_to(m["mask"][..., None], (2, 6, 12)), 2, 4, 6, 3)
    np.testing.assert_array_equal(rec["masked"], jnp.where(hidden > 0, 0.0, img))
    with pytest.raises(UserError, match="does not divide"):
        M.patchify(img, 4)


def test_mae_model_sees_visible_patches_only_and_trains():
    cfg = M.MAEConfig(patch_size=4, decoder_d_model=16, decoder_layers=1, decoder_heads=2)
    model = M.MAE(TinyPatchEncoder(4, 16), cfg)
    img = np.random.default_rng(6).uniform(size=(2, 8, 8, 3)).astype(np.float32)
    task = M.mae_task(model)
    m = M.random_masking(jax.random.key(7), 2, 4, 0.75)

    hidden = np.asarray(M.unpatchify(jnp.broadcast_to(m["mask"][..., None], (2, 4, 48)),
                                     4, 8, 8, 3)) > 0
    # the same images with every hidden patch painted over, and with a visible one changed
    both = np.concatenate([img, np.where(hidden, 5.0, img), np.where(hidden, img, 5.0)])
    keep, restore = (np.tile(np.asarray(m[k]), (3, 1)) for k in ("keep", "restore"))

    @jax.jit
    def check(img):
        """Init; predictions for the three batches; task loss and gradient; the loss after
        one SGD step: one compile, one copy of the model per pass."""
        params, state = task.init(jax.random.key(0), {"image": img})
        pred = model.apply({"params": params}, jnp.asarray(both), keep, restore)
        loss_fn = lambda p: task.loss(p, state, {"image": img}, jax.random.key(8), True)[0]  # noqa: E731
        value, grads = jax.value_and_grad(loss_fn)(params)
        after = loss_fn(jax.tree.map(lambda p, g: p - 0.05 * g, params, grads))
        return pred, value, grads, after

    preds, value, grads, after = check(img)
    chex.assert_shape(preds, (6, 4, 48))
    # no prediction depends on a hidden patch's pixels: the encoder never saw them
    np.testing.assert_allclose(preds[2:4], preds[:2], atol=1e-6)
    assert not np.allclose(preds[4:], preds[:2], atol=1e-4)  # visible pixels do count
    chex.assert_tree_all_finite(grads)
    assert float(jnp.abs(grads["encoder"]["Dense_0"]["kernel"]).sum()) > 0
    assert float(after) < float(value)
