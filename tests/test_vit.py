"""ViT: patchify (conv == reshape), pooling, positions (learned resized, 2-D sin-cos), the
shared encoder underneath, kept-token input, attention maps, one-line errors."""
import dataclasses

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcourse.errors import UserError
from jaxcourse.models import vit

TINY = vit.ViTConfig(image_size=8, channels=1, patch_size=2, n_layer=2, n_head=2, d_model=16,
                     d_ff=32, num_classes=10)


@pytest.fixture(scope="module")
def digits():
    return jax.random.uniform(jax.random.PRNGKey(1), (3, 8, 8, 1))




@pytest.fixture(scope="module")
def base(digits):
    """TINY's classifier parameters, initialized once (jitted: eager init compiles every
    initializer on its own, seconds on CPU), perturbed so no bias or head is zero."""
    params = jax.jit(vit.ViTClassifier(TINY).init)(jax.random.PRNGKey(0), digits)["params"]
    rng = np.random.default_rng(2)  # numpy: jax.random would compile once per leaf shape
    return jax.tree.map(lambda a: a + 0.1 * rng.standard_normal(a.shape, np.float32),
                        nn.meta.unbox(params))


def init(cfg, base, module=vit.ViTClassifier):
    """`base` cut to cfg: no class token with pool="gap", no table with sincos positions."""
    params = dict(base["vit"])
    if cfg.pool == "gap":
        params.pop("cls")
    if cfg.pos == "sincos":
        params.pop("pos_embedding")
    return {"vit": params, "head": base["head"]} if module is vit.ViTClassifier else params


def apply(cfg, module=vit.ViTClassifier, **kwargs):
    return lambda params, x: module(cfg).apply({"params": params}, x, **kwargs)




def test_patchify_layout_and_inverse():
    x = jnp.arange(2 * 4 * 6 * 3, dtype=jnp.float32).reshape(2, 4, 6, 3)
    p = vit.patchify(x, 2)
    chex.assert_shape(p, (2, 6, 12))
    np.testing.assert_array_equal(p[1, 4].reshape(2, 2, 3), x[1, 2:4, 2:4])  # row 1, col 1
    np.testing.assert_array_equal(vit.unpatchify(p, 2, 4, 6, 3), x)


def test_conv_and_reshape_patchify_are_equal_on_the_same_weights(digits, base):
    params = base
    outs = [apply(dataclasses.replace(TINY, patchify=mode))(params, digits)
            for mode in vit.PATCHIFY]
    chex.assert_shape(outs, (3, 10))
    np.testing.assert_allclose(outs[0], outs[1], atol=1e-5)
    embed = params["vit"]["patch_embed"]
    # the first token's features are the kernel applied to the top-left patch
    manual = jnp.einsum("bhwc,hwcd->bd", digits[:, :2, :2], embed["kernel"]) + embed["bias"]
    got = vit.PatchEmbed(16, 2, "conv").apply({"params": embed}, digits)[:, 0]
    np.testing.assert_allclose(got, manual, atol=1e-5)


@pytest.mark.parametrize("mode", vit.PATCHIFY)
@pytest.mark.parametrize("pos", vit.POSITIONS)
def test_bfloat16_compute_and_bfloat16_params(digits, base, mode, pos):
    """model.dtype=bfloat16 computes every token in bfloat16 (patches, positions, class token,
    blocks); bfloat16 parameters and images, as train.precision=bfloat16 casts them, run at
    either compute dtype (the conv refused a float32 image with a bfloat16 kernel)."""
    cfg = dataclasses.replace(TINY, patchify=mode, pos=pos)
    params = init(cfg, base)
    want = apply(cfg)(params, digits)
    bf16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
    x16 = digits.astype(jnp.bfloat16)
    tokens = apply(dataclasses.replace(cfg, dtype="bfloat16"), vit.ViT)(
        params["vit"], digits)["tokens"]
    assert tokens.dtype == jnp.bfloat16
    for dtype in ("float32", "bfloat16"):
        got = apply(dataclasses.replace(cfg, dtype=dtype))(bf16, x16)
        assert got.dtype == jnp.dtype(dtype)
        np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=0.1)


@pytest.mark.parametrize("pool", vit.POOLS)
def test_outputs_and_pooling(digits, pool, base):
    cfg = dataclasses.replace(TINY, pool=pool, num_classes=0)
    params = init(cfg, base, vit.ViT)
    out = apply(cfg, vit.ViT)(params, digits)
    chex.assert_shape(out["tokens"], (3, 16 + cfg.n_prefix, 16))
    chex.assert_shape(out["pooled"], (3, 16))
    chex.assert_tree_all_finite(out)
    want = out["tokens"][:, 0] if pool == "cls" else out["tokens"].mean(1)
    np.testing.assert_allclose(out["pooled"], want, atol=1e-6)
    assert ("cls" in params) == (pool == "cls")
    # the blocks are the shared encoder's (models/encoder_decoder.py), not a private stack
    assert set(params["encoder"]["blocks"]) == {"layer_0", "layer_1"}


def test_tokens_see_each_other_without_a_mask(digits, base):
    """Bidirectional: changing the last patch changes the first token's output."""
    cfg = dataclasses.replace(TINY, pool="gap", num_classes=0)
    params = init(cfg, base, vit.ViT)
    moved = digits.at[:, 6:, 6:].add(1.0)
    a, b = (apply(cfg, vit.ViT)(params, x)["tokens"] for x in (digits, moved))
    assert float(jnp.abs(a[:, 0] - b[:, 0]).max()) > 1e-4


def test_learned_positions_interpolate_and_are_unchanged_at_their_own_size():
    table = jax.random.normal(jax.random.PRNGKey(0), (4, 4, 8))
    np.testing.assert_array_equal(vit.interpolate_positions(table, 4, 4), table)
    # the resize itself (no shortcut) is the identity at the same size, too
    same = jax.image.resize(table, (4, 4, 8), "bilinear")
    np.testing.assert_allclose(same, table, atol=1e-6)
    big = vit.interpolate_positions(table, 8, 8)
    chex.assert_shape(big, (8, 8, 8))
    # bilinear: a constant table stays constant, values stay inside the original range
    np.testing.assert_allclose(vit.interpolate_positions(jnp.ones((4, 4, 8)), 6, 6), 1.0,
                               atol=1e-6)
    assert float(big.max()) <= float(table.max()) + 1e-6


def test_a_model_runs_at_another_resolution(digits, base):
    params = init(TINY, base)
    logits = apply(TINY)(params, jnp.ones((1, 12, 12, 1)))  # learned positions resized
    chex.assert_shape(logits, (1, 10))
    chex.assert_tree_all_finite(logits)
    sincos = dataclasses.replace(TINY, pos="sincos", pool="gap", num_classes=0)
    p = init(sincos, base, vit.ViT)
    assert "pos_embedding" not in p  # fixed: nothing learned, nothing to resize
    chex.assert_shape(apply(sincos, vit.ViT)(p, jnp.ones((1, 12, 12, 1)))["tokens"],
                      (1, 36, 16))


def test_sincos_2d_at_a_new_grid():
    d = 8
    table = vit.sincos_2d(3, 5, d)
    chex.assert_shape(table, (3, 5, d))
    for r in range(3):
        for c in range(5):
            omega = 1.0 / 10000 ** (np.arange(d // 4) / (d // 4))
            want = np.concatenate([np.sin(r * omega), np.cos(r * omega),
                                   np.sin(c * omega), np.cos(c * omega)])
            np.testing.assert_allclose(table[r, c], want, atol=1e-6)
    # a larger grid extends the smaller one: the same positions get the same codes
    np.testing.assert_allclose(vit.sincos_2d(6, 7, d)[:3, :5], table, atol=1e-6)


def test_kept_tokens_are_the_visible_patches(digits, base):
    cfg = dataclasses.replace(TINY, pool="gap", num_classes=0)
    params = init(cfg, base, vit.ViT)
    keep = jnp.array([[0, 5, 7, 15]] * 3)
    run = apply(cfg, vit.ViT, keep_BxK=keep)
    out = run(params, digits)
    chex.assert_shape(out["tokens"], (3, 4, 16))
    # the encoder of only those tokens: zeroing an unkept patch changes nothing
    hidden = digits.at[:, 0:2, 2:4].set(0.0)  # patch 1, not kept
    again = run(params, hidden)
    np.testing.assert_allclose(again["tokens"], out["tokens"], atol=1e-6)


def test_attention_maps_and_rollout(digits, base):
    params = init(TINY, base)
    maps = vit.attention_maps(TINY, params["vit"], digits)
    chex.assert_shape(maps, (2, 3, 2, 17, 17))
    np.testing.assert_allclose(maps.sum(-1), 1.0, atol=1e-5)
    rollout = vit.attention_rollout(maps)
    chex.assert_shape(rollout, (3, 17, 17))
    np.testing.assert_allclose(rollout.sum(-1), 1.0, atol=1e-5)


@pytest.mark.parametrize("changes, message", [
    ({"patch_size": 3}, "patch size 3 does not divide the image size 8x8"),
    ({"pool": "max"}, "model.pool='max' is not one of cls, gap"),
    ({"pos": "sincos", "d_model": 18, "n_head": 2}, "needs d_model divisible by 4"),
    ({"d_model": 15}, "not divisible by n_head"),
])
def test_bad_configs_are_one_line(changes, message):
    with pytest.raises(UserError, match=message) as info:
        dataclasses.replace(TINY, **changes)
    assert "\n" not in str(info.value)


def test_bad_image_is_one_line(digits, base):
    params = init(TINY, base)
    with pytest.raises(UserError, match="patch size 2 does not divide the image size 9x9"):
        vit.ViTClassifier(TINY).apply({"params": params}, jnp.ones((1, 9, 9, 1)))
    with pytest.raises(UserError, match="unknown ViT model keys: depth"):
        vit.vit_config({"depth": 3})
