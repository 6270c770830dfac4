"""Swin: shifted-window attention equals masked full attention on the same weights; the shift
mask, relative position index, patch merging, the model's shapes and one-line errors."""
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcourse.errors import UserError
from jaxcourse.models import swin


@pytest.fixture(scope="module")
def attention_params():
    x = jnp.zeros((1, 8, 8, 16))
    params = nn.meta.unbox(jax.jit(swin.WindowAttention(2, 4).init)(jax.random.PRNGKey(0),
                                                                    x)["params"])
    rng = np.random.default_rng(1)  # biases and the bias table away from zero
    return jax.tree.map(lambda a: a + 0.2 * rng.standard_normal(a.shape, np.float32), params)


@pytest.mark.parametrize("shifted", [False, True])
def test_window_attention_equals_masked_full_attention(attention_params, shifted):
    x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 8, 8, 16), np.float32))
    got = swin.WindowAttention(2, 4, shifted).apply({"params": attention_params}, x)
    want = swin.window_attention_reference(attention_params, x, 2, 4, shifted)
    chex.assert_shape(got, (2, 8, 8, 16))
    np.testing.assert_allclose(got, want, atol=1e-5)
    if shifted:  # the mask matters: without it the wrapped-around windows differ
        plain = swin.WindowAttention(2, 4, False).apply({"params": attention_params},
                                                        jnp.roll(x, (-2, -2), (1, 2)))
        plain = jnp.roll(plain, (2, 2), (1, 2))
        assert float(jnp.abs(plain - want)[:, -2:].max()) > 1e-3  # the last rows wrapped
        np.testing.assert_allclose(plain[:, 2:6, 2:6], want[:, 2:6, 2:6], atol=1e-5)


def test_shift_mask_regions():
    mask = swin.shift_mask(8, 8, 4, 2)
    chex.assert_shape(mask, (4, 16, 16))
    # windows: top-left untouched (one region), top-right and bottom-left split in two,
    # bottom-right in four
    np.testing.assert_array_equal(mask.sum((1, 2)), [256, 2 * 64, 2 * 64, 4 * 16])
    assert mask[np.arange(4)[:, None], np.arange(16), np.arange(16)].all()  # self always
    np.testing.assert_array_equal(mask, mask.transpose(0, 2, 1))
    # top-right window, row 0: columns 0,1 of the window (image columns 6,7) vs 2,3 (wrapped)
    assert mask[1, 0, 1] and not mask[1, 0, 2]


def test_relative_index():
    idx = swin.relative_index(3)
    chex.assert_shape(idx, (9, 9))
    assert idx.min() == 0 and idx.max() == 24 and len(np.unique(idx)) == 25
    np.testing.assert_array_equal(np.diag(idx), 12)  # offset (0, 0): the table's centre
    assert idx[0, 8] == 0 and idx[8, 0] == 24  # (-2, -2) and (+2, +2)


def test_partition_merge_round_trip():
    x = jnp.arange(2 * 8 * 4 * 3, dtype=jnp.float32).reshape(2, 8, 4, 3)
    w = swin.partition(x, 4)
    chex.assert_shape(w, (2, 2, 16, 3))
    np.testing.assert_array_equal(w[0, 1].reshape(4, 4, 3), x[0, 4:8, 0:4])
    np.testing.assert_array_equal(swin.merge(w, 8, 4, 4), x)


def test_patch_merging_and_model_shapes():
    x = jnp.arange(2 * 4 * 4 * 2, dtype=jnp.float32).reshape(2, 4, 4, 2)
    merged = swin.PatchMerging()
    params = merged.init(jax.random.PRNGKey(0), x)
    chex.assert_shape(merged.apply(params, x), (2, 2, 2, 4))
    cfg = swin.SwinConfig(image_size=16, channels=3, patch_size=2, window=4, d_model=8,
                          depths=(2, 1), heads=(2, 2), mlp_ratio=2, num_classes=5)
    images = jnp.ones((2, 16, 16, 3))
    # shapes only (compiling the whole model costs ~7 s on CPU; the attention's numbers are
    # checked above against the reference)
    logits, variables = jax.eval_shape(swin.SwinClassifier(cfg).init_with_output,
                                       jax.random.PRNGKey(0), images)
    chex.assert_shape(logits, (2, 5))
    p = nn.meta.unbox(variables["params"])["swin"]
    assert set(p) == {"patch_embed", "stage_0_block_0", "stage_0_block_1", "merge_1",
                      "stage_1_block_0", "final_norm"}
    # stage 2's grid (4x4) fits one window: whole-grid attention, a (2*4-1)^2 table
    chex.assert_shape(p["stage_1_block_0"]["attention"]["relative_bias"], (49, 2))
    chex.assert_shape(p["merge_1"]["reduction"]["kernel"], (32, 16))


@pytest.mark.parametrize("kwargs, message", [
    ({"image_size": 24, "patch_size": 2, "window": 5},
     "window size 5 does not divide the patch grid 12x12"),
    ({"image_size": 16, "patch_size": 3}, "patch size 3 does not divide the image size 16x16"),
    ({"depths": (2,), "heads": (2, 4)}, "one entry per stage"),
    ({"d_model": 6, "heads": (4, 4)}, "width 6 is not divisible by 4 heads"),
])
def test_bad_configs_are_one_line(kwargs, message):
    with pytest.raises(UserError, match=message) as info:
        swin.SwinConfig(**kwargs)
    assert "\n" not in str(info.value)


def test_window_that_does_not_tile_the_input_grid_is_one_line():
    with pytest.raises(UserError, match="window size 3 does not divide the patch grid 8x8"):
        swin.check_window(8, 8, 3)
    swin.check_window(2, 2, 4)  # a grid smaller than the window is one window
