"""Contrastive losses (CLIP, SigLIP; sharded == one device), zero-shot scoring, retrieval."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxcourse.errors import UserError
from jaxcourse.parallel import make_mesh
from jaxcourse.vision import contrastive as C


def _pair(b=16, d=6, seed=0):
    rng = np.random.default_rng(seed)
    unit = lambda x: (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)  # noqa: E731
    img = unit(rng.normal(size=(b, d)))
    return img, unit(img + 0.7 * rng.normal(size=(b, d)))


def test_clip_loss_matches_optax_cross_entropy_both_ways():
    img, txt = _pair()
    t = jnp.float32(2.0)
    logits = jnp.exp(t) * img @ txt.T
    labels = jnp.arange(16)
    want = 0.5 * (optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
                  + optax.softmax_cross_entropy_with_integer_labels(logits.T, labels).mean())
    loss = jax.jit(C.clip_loss)
    np.testing.assert_allclose(loss(img, txt, t), want, rtol=1e-6)
    # the scale is clipped at 100 (CLIP section 2.5): t beyond log 100 changes nothing
    np.testing.assert_allclose(loss(img, txt, jnp.float32(9.0)),
                               loss(img, txt, jnp.float32(np.log(100.0))), rtol=1e-6)


def test_siglip_loss_is_the_pairwise_logistic_sum():
    img, txt = _pair(b=5)
    t, b = jnp.float32(C.SIGLIP_INIT_LOG_SCALE), jnp.float32(C.SIGLIP_INIT_BIAS)
    sim = np.asarray(img @ txt.T, np.float64)
    z = 2 * np.eye(5) - 1
    want = np.log1p(np.exp(-z * (np.exp(float(t)) * sim + float(b)))).sum() / 5
    np.testing.assert_allclose(jax.jit(C.siglip_loss)(img, txt, t, b), want, rtol=1e-5)
    with pytest.raises(UserError, match="one shape"):
        C.siglip_loss(img, txt[:4], t, b)


def test_sharded_losses_and_gradients_equal_one_device():
    mesh = make_mesh({"data": 8})
    img, txt = _pair(b=16, d=8)
    t, b = jnp.float32(1.3), jnp.float32(-2.0)
    one_clip = jax.jit(jax.value_and_grad(C.clip_loss, argnums=(0, 1, 2)))
    one_sig = jax.jit(jax.value_and_grad(C.siglip_loss, argnums=(0, 1, 2, 3)))
    with jax.set_mesh(mesh):
        many_clip = jax.jit(jax.value_and_grad(
            lambda x, y, t: C.sharded_clip_loss(x, y, t, mesh), argnums=(0, 1, 2)))
        many_sig = jax.jit(jax.value_and_grad(
            lambda x, y, t, b: C.sharded_siglip_loss(x, y, t, b, mesh), argnums=(0, 1, 2, 3)))
        got = [many_clip(img, txt, t), many_sig(img, txt, t, b)]
        hlo = many_sig.lower(img, txt, t, b).as_text()
    want = [one_clip(img, txt, t), one_sig(img, txt, t, b)]
    assert "collective_permute" in hlo and "all_gather" not in hlo  # the ring, no gather
    for (gl, gg), (wl, wg) in zip(got, want):
        np.testing.assert_allclose(gl, wl, rtol=1e-5, atol=1e-5)
        for a, w in zip(gg, wg):
            chex.assert_equal_shape([a, w])
            np.testing.assert_allclose(a, w, rtol=1e-5, atol=1e-5)
    with pytest.raises(UserError, match="does not split over data=8"):
        C.sharded_clip_loss(img[:12], txt[:12], t, mesh)


def test_zero_shot_prompt_ensembling_averages_normalised_prompts():
    # A deterministic "text encoder": each word has a fixed vector; a prompt is the sum.
    vocab = {"a": [0, 0, 0, 1.0], "photo": [0, 0, 0, 3.0], "of": [0, 0, 0, 0.5],
             "cat": [1.0, 0, 0, 0], "dog": [0, 1.0, 0, 0], "bird": [0, 0, 1.0, 0],
             "drawing": [0, 0, 0, -2.0]}
    encode = lambda texts: jnp.array([np.sum([vocab[w] for w in t.split()], 0)  # noqa: E731
                                      for t in texts], jnp.float32)
    names, templates = ["cat", "dog", "bird"], ["a photo of {}", "a drawing of {}"]
    cls = C.zero_shot_classifier(names, templates, encode)
    chex.assert_shape(cls, (3, 4))
    for k, name in enumerate(names):
        prompts = C.l2_normalize(encode([t.format(name) for t in templates]))
        mean = prompts.mean(0)
        np.testing.assert_allclose(cls[k], mean / jnp.linalg.norm(mean), atol=1e-5)
    np.testing.assert_allclose(jnp.linalg.norm(cls, axis=-1), 1.0, atol=1e-5)
    images = jnp.array([[0.1, 0, 2.0, 0.3], [3.0, 0.2, 0, 0.1], [0, 1.0, 0.1, 0]])
    np.testing.assert_array_equal(C.zero_shot_logits(images, cls).argmax(-1), [2, 0, 1])
    assert C.zero_shot_accuracy(images, cls, [2, 0, 0]) == pytest.approx(2 / 3)
    with pytest.raises(UserError, match="has no"):
        C.zero_shot_classifier(names, ["a photo"], encode)


def test_retrieval_recall_on_a_hand_built_matrix():
    # 3 images; captions 0,1 -> image 0, caption 2 -> image 1, captions 3,4 -> image 2.
    owner = np.array([0, 0, 1, 2, 2])
    sim = np.array([[0.1, 0.8, 0.9, 0.0, 0.2],   # image 0: best caption is 2 (wrong), then 1
                    [0.5, 0.0, 0.7, 0.1, 0.0],   # image 1: its caption 2 is first
                    [0.9, 0.0, 0.0, 0.3, 0.1]])  # image 2: caption 0 first, then 3 (rank 1)
    r = C.retrieval_recall(sim, owner, ks=(1, 2, 5))
    assert r["i2t_r1"] == pytest.approx(1 / 3)
    assert r["i2t_r2"] == 1.0
    # text->image: cap0 [0.1,0.5,0.9] -> image 2 first, its image 0 last (rank 2);
    # cap1 right at rank 0; cap2: 0.9 (img0) > 0.7 -> rank 1; cap3 right; cap4 0.2 > 0.1 rank 1
    assert r["t2i_r1"] == pytest.approx(2 / 5)
    assert r["t2i_r2"] == pytest.approx(4 / 5)
    assert r["t2i_r5"] == 1.0
    tie = C.retrieval_recall(np.ones((2, 2)), [0, 1], ks=(1,))
    assert tie == {"i2t_r1": 0.0, "t2i_r1": 0.0}  # ties rank against the query
    with pytest.raises(UserError, match="at least one caption"):
        C.retrieval_recall(sim, [0, 0, 0, 2, 2])
