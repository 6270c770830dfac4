"""CLIP / SigLIP dual encoder: config checks, unit embeddings and initial scalars, text
pooling ignores padding, the contrastive task trains, linear probe, MLP and adapter heads."""
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcourse.errors import UserError
from jaxcourse.models import clip as CL
from jaxcourse.vision import contrastive as C


class TinyImageEncoder(nn.Module):
    """Stand-in for the ViT: a per-pixel layer and global average pooling."""
    d: int = 16

    @nn.compact
    def __call__(self, images, *, train=False):
        return {"pooled": nn.gelu(nn.Dense(self.d)(images)).mean(axis=(1, 2))}


CFG = dict(embed_dim=8, vocab_size=11, text_context=6, text_layers=1, text_heads=2,
           text_width=16)


def _batch(b=4):
    rng = np.random.default_rng(0)  # numpy: no eager jax op to compile
    valid = np.arange(6)[None, :] < np.array([3, 6, 4, 2])[:b, None]
    return {"image": rng.uniform(size=(b, 4, 4, 3)).astype(np.float32),
            "tokens": np.where(valid, rng.integers(1, 11, (b, 6)), 0).astype(np.int32),
            "valid": valid}


def test_config_is_validated():
    with pytest.raises(UserError, match="clip.loss='triplet'"):
        CL.CLIPConfig(loss="triplet")
    with pytest.raises(UserError, match="text_pool"):
        CL.CLIPConfig(text_pool="cls")
    with pytest.raises(UserError, match="not divisible"):
        CL.CLIPConfig(text_width=10, text_heads=4)
    with pytest.raises(UserError, match="a prompt has 5 tokens, longer than the text context 4"):
        CL.encode_texts(None, None, lambda s: [1] * len(s), ["ab", "abcde"], context=4)


@pytest.mark.parametrize("loss,pool,causal", [("clip", "last", True),
                                              ("siglip", "mean", False)])
def test_model_outputs_padding_and_a_task_step(loss, pool, causal):
    cfg = CL.CLIPConfig(**CFG, loss=loss, text_pool=pool, text_causal=causal)
    model = CL.CLIP(TinyImageEncoder(), cfg)
    batch = _batch()
    # one batch of three copies: as given, junk in the padding, a changed first token
    junk = np.where(batch["valid"], batch["tokens"], 7)
    other = batch["tokens"].copy()
    other[:, 0] = 10
    triple = {"image": np.concatenate([batch["image"]] * 3),
              "tokens": np.concatenate([batch["tokens"], junk, other]).astype(np.int32),
              "valid": np.concatenate([batch["valid"]] * 3)}
    both, variables = jax.jit(model.init_with_output)(
        jax.random.key(1), triple["image"], triple["tokens"], triple["valid"])
    params = variables["params"]
    out = {**both, "image": both["image"][:4], "text": both["text"][:4]}
    chex.assert_shape([out["image"], out["text"]], [(4, 8), (4, 8)])
    np.testing.assert_allclose(jnp.linalg.norm(out["text"], axis=-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(jnp.linalg.norm(out["image"], axis=-1), 1.0, atol=1e-5)
    want_t, want_b = ((np.log(1 / 0.07), 0.0) if loss == "clip" else (np.log(10.0), -10.0))
    np.testing.assert_allclose([out["log_scale"], out["bias"]], [want_t, want_b], rtol=1e-6)
    # whatever sits in the padding, the caption embeddings stay the same
    np.testing.assert_allclose(both["text"][4:8], out["text"], atol=1e-5)
    # ...but a real token does change them
    assert not np.allclose(both["text"][8:], out["text"], atol=1e-4)
    with pytest.raises(UserError, match="longer than the model context"):
        model.apply({"params": params}, np.zeros((4, 7), np.int32), method=CL.CLIP.encode_text)
    # the task: its init builds these parameters; its loss is the configured one
    task = CL.contrastive_task(model)
    shapes = jax.eval_shape(task.init, jax.random.key(2), batch)[0]
    chex.assert_trees_all_equal_shapes(shapes, params)
    if loss == "clip":
        np.testing.assert_allclose(CL.contrastive_loss(out, cfg), C.clip_loss(
            out["image"], out["text"], out["log_scale"]), rtol=1e-6)
        return
    # (siglip) one gradient step lowers it
    grad_fn = jax.jit(jax.value_and_grad(
        lambda p: task.loss(p, {}, batch, jax.random.key(3), True)[0]))
    value, grads = grad_fn(params)
    chex.assert_tree_all_finite(grads)
    stepped = jax.tree.map(lambda p, g: p - 0.05 * g, params, grads)
    assert float(grad_fn(stepped)[0]) < float(value)


def _fit(heads, batch, steps=30, lr=0.1):
    """Per head: (logits at init, first loss, last loss) of `steps` SGD steps. One compile
    for all heads."""
    @jax.jit
    def run(key):
        results = []
        for head in heads:
            task = CL.feature_task(head)
            params, _ = task.init(key, batch)
            grad = jax.value_and_grad(lambda p: task.loss(p, {}, batch, key, True)[0])  # noqa: B023
            first = grad(params)[0]

            def body(_, p):
                return jax.tree.map(lambda w, g: w - lr * g, p, grad(p)[1])  # noqa: B023
            last = grad(jax.lax.fori_loop(0, steps, body, params))[0]
            results.append((head.apply({"params": params}, batch["features"]), first, last))
        return results

    return run(jax.random.key(5))


def test_linear_probe_and_adapter_heads():
    rng = np.random.default_rng(0)
    classifier = np.asarray(C.l2_normalize(jnp.asarray(rng.normal(size=(3, 8)))))
    labels = rng.integers(0, 3, 24)
    feats = (classifier[labels] + 0.3 * rng.normal(size=(24, 8))).astype(np.float32)
    batch = {"features": feats, "label": labels}
    adapter = CL.FeatureHead(3, "adapter", classifier_KxD=classifier, scale=10.0)
    (logits, first, last), (_, probe_first, probe_last), (_, mlp_first, mlp_last) = _fit(
        [adapter, CL.FeatureHead(3, "linear"), CL.FeatureHead(3, "mlp", hidden=16)], batch)
    # at init the adapter is the zero-shot classifier; training lowers both heads' loss
    np.testing.assert_allclose(logits, 10.0 * C.zero_shot_logits(feats, classifier),
                               rtol=1e-4, atol=1e-4)
    assert float(last) < 0.8 * float(first)
    assert float(probe_last) < 0.8 * float(probe_first)
    assert float(mlp_last) < 0.8 * float(mlp_first)
    with pytest.raises(UserError, match="needs the zero-shot classifier"):
        CL.FeatureHead(3, "adapter").init(jax.random.key(0), feats)
