"""Image-text contrastive learning: CLIP's InfoNCE, SigLIP's sigmoid loss (both also sharded
over the batch), zero-shot classification with prompt ensembling, and retrieval recall.

CLIP (Radford et al. 2021, fig. 3): with L2-normalised embeddings x_i (images), y_j (texts)
and a learnable log-temperature t (init log 1/0.07, the scale exp(t) clipped at 100),

    logits_ij = exp(t) x_i . y_j
    L = 1/2 [ CE(logits, diag) over rows + CE(logits^T, diag) over rows ]  (mean over B)

SigLIP (Zhai et al. 2023, eq. 1 / algorithm 1): every pair is a binary problem, z_ij = +1 on
the diagonal and -1 off it, with a learnable t' (init log 10) and bias b (init -10):

    L = -1/|B| sum_i sum_j log sigmoid(z_ij (exp(t') x_i . y_j + b))

Sharded over the `data` axis (`jax.shard_map`):
- InfoNCE needs each row's full softmax denominator, so every device all-gathers both
  embedding sets ([B, D] each, cheap next to the towers) and computes its own B/n rows of
  the image->text and text->image losses; a psum gives the global mean.
- SigLIP has no normaliser across the row, so it uses the paper's chunked formulation: the
  text embeddings travel around a ring (`ppermute`, n - 1 hops) and each device adds the
  [B/n, B/n] block of its images against the texts it holds at the moment. Memory stays at
  one block per device instead of a [B/n, B] slab, and the positives sit in block 0 only.
The autodiff of all_gather / ppermute is reduce-scatter / the reverse ring, so gradients
match the one-device loss too (tests/test_contrastive.py, 8 simulated devices).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from jaxcourse.errors import UserError

CLIP_INIT_LOG_SCALE = math.log(1 / 0.07)
CLIP_MAX_LOG_SCALE = math.log(100.0)
SIGLIP_INIT_LOG_SCALE = math.log(10.0)
SIGLIP_INIT_BIAS = -10.0


def l2_normalize(x, axis: int = -1, eps: float = 1e-6):
    return x / jnp.sqrt(jnp.sum(x * x, axis=axis, keepdims=True) + eps)


def _check_pair(img_BxD, txt_BxD):
    if img_BxD.ndim != 2 or img_BxD.shape != txt_BxD.shape:
        raise UserError(f"contrastive loss needs image and text embeddings of one shape [B, D],"
                        f" got {tuple(img_BxD.shape)} and {tuple(txt_BxD.shape)}")


def _clip_scale(log_scale):
    return jnp.exp(jnp.minimum(log_scale, CLIP_MAX_LOG_SCALE))


def _xent_rows(logits_RxB, labels_R):
    """Sum over rows of -log softmax(logits)[label]."""
    logp = jax.nn.log_softmax(logits_RxB.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, labels_R[:, None], axis=-1).sum()


def clip_loss(img_BxD, txt_BxD, log_scale):
    """Symmetric InfoNCE (CLIP) of L2-normalised embeddings; pair i is (img i, txt i)."""
    _check_pair(img_BxD, txt_BxD)
    b = img_BxD.shape[0]
    logits = _clip_scale(log_scale) * img_BxD @ txt_BxD.T
    labels = jnp.arange(b)
    return (_xent_rows(logits, labels) + _xent_rows(logits.T, labels)) / (2 * b)


def _siglip_block(img_RxD, txt_CxD, log_scale, bias, positive: bool):
    logits = jnp.exp(log_scale) * img_RxD @ txt_CxD.T + bias
    z = 2 * jnp.eye(*logits.shape) - 1 if positive else -jnp.ones_like(logits)
    return -jax.nn.log_sigmoid(z * logits).sum()


def siglip_loss(img_BxD, txt_BxD, log_scale, bias):
    """Sigmoid loss (SigLIP) of L2-normalised embeddings, normalised by the batch size."""
    _check_pair(img_BxD, txt_BxD)
    return _siglip_block(img_BxD, txt_BxD, log_scale, bias, True) / img_BxD.shape[0]


def _check_mesh(img_BxD, mesh: Mesh, axis: str):
    n = mesh.shape[axis]
    if img_BxD.shape[0] % n:
        raise UserError(f"contrastive batch of {img_BxD.shape[0]} does not split over "
                        f"{axis}={n} devices")


def sharded_clip_loss(img_BxD, txt_BxD, log_scale, mesh: Mesh, axis: str = "data"):
    """`clip_loss` with the batch split over `axis`: all_gather, local rows, psum."""
    _check_pair(img_BxD, txt_BxD)
    _check_mesh(img_BxD, mesh, axis)
    b = img_BxD.shape[0]

    def local(img_RxD, txt_RxD, log_scale):
        r = img_RxD.shape[0]
        all_img = jax.lax.all_gather(img_RxD, axis, tiled=True)
        all_txt = jax.lax.all_gather(txt_RxD, axis, tiled=True)
        labels = jax.lax.axis_index(axis) * r + jnp.arange(r)
        scale = _clip_scale(log_scale)
        part = (_xent_rows(scale * img_RxD @ all_txt.T, labels)
                + _xent_rows(scale * txt_RxD @ all_img.T, labels))
        return jax.lax.psum(part, axis) / (2 * b)

    return jax.shard_map(local, mesh=mesh, in_specs=(P(axis), P(axis), P()), out_specs=P(),
                         axis_names={axis})(img_BxD, txt_BxD, log_scale)


def sharded_siglip_loss(img_BxD, txt_BxD, log_scale, bias, mesh: Mesh, axis: str = "data"):
    """`siglip_loss` with the batch split over `axis`: texts go round a ppermute ring."""
    _check_pair(img_BxD, txt_BxD)
    _check_mesh(img_BxD, mesh, axis)
    n, b = mesh.shape[axis], img_BxD.shape[0]
    ring = [(i, (i + 1) % n) for i in range(n)]

    def local(img_RxD, txt_RxD, log_scale, bias):
        total = _siglip_block(img_RxD, txt_RxD, log_scale, bias, True)
        for _ in range(n - 1):  # n is a small static number: unrolled hops
            txt_RxD = jax.lax.ppermute(txt_RxD, axis, ring)
            total = total + _siglip_block(img_RxD, txt_RxD, log_scale, bias, False)
        return jax.lax.psum(total, axis) / b

    return jax.shard_map(local, mesh=mesh, in_specs=(P(axis), P(axis), P(), P()),
                         out_specs=P(), axis_names={axis})(img_BxD, txt_BxD, log_scale, bias)


# ---------------------------------------------------------------- zero-shot classification
def zero_shot_classifier(class_names: Sequence[str], templates: Sequence[str],
                         encode_text: Callable[[list[str]], jax.Array]):
    """Class embeddings [K, D] by prompt ensembling (CLIP section 3.1.4): each class's
    prompts `template.format(name)` are encoded, L2-normalised, averaged, renormalised.

    encode_text: list of N strings -> [N, D] embeddings (normalised or not).
    """
    if not class_names or not templates:
        raise UserError("zero-shot classification needs at least one class name and template")
    bad = [t for t in templates if "{}" not in t]
    if bad:
        raise UserError(f"prompt template {bad[0]!r} has no '{{}}' for the class name")
    prompts = [t.format(name) for name in class_names for t in templates]
    emb = jnp.asarray(encode_text(prompts))
    if emb.ndim != 2 or emb.shape[0] != len(prompts):
        raise UserError(f"encode_text returned shape {tuple(emb.shape)} for "
                        f"{len(prompts)} prompts; expected [{len(prompts)}, D]")
    emb_KxTxD = l2_normalize(emb).reshape(len(class_names), len(templates), -1)
    return l2_normalize(emb_KxTxD.mean(axis=1))


def zero_shot_logits(img_BxD, classifier_KxD):
    """Cosine similarity of each image to each class embedding: [B, K]."""
    return l2_normalize(img_BxD) @ classifier_KxD.T


def zero_shot_accuracy(img_BxD, classifier_KxD, labels_B) -> float:
    pred = np.asarray(zero_shot_logits(img_BxD, classifier_KxD).argmax(-1))
    return float((pred == np.asarray(labels_B)).mean())


# ---------------------------------------------------------------- retrieval
def retrieval_recall(sim_IxT, caption_image_T, ks: Sequence[int] = (1, 5, 10)) -> dict:
    """Recall@k both ways for I images and T captions, caption j describing image
    `caption_image_T[j]` (an image may have several captions).

    image->text: an image is a hit at k if one of its captions is among its k most similar
    captions; text->image: a caption is a hit if its image is among its k most similar
    images. Ties count against the query (a wrong item as similar as the right one ranks
    above it). Returns {"i2t_r1": ..., "t2i_r1": ..., ...}.
    """
    sim = np.asarray(sim_IxT, dtype=np.float64)
    owner = np.asarray(caption_image_T)
    if sim.ndim != 2 or owner.shape != (sim.shape[1],):
        raise UserError(f"retrieval needs sim [I, T] and one image index per caption, got "
                        f"{sim.shape} and {owner.shape}")
    if owner.min(initial=0) < 0 or owner.max(initial=0) >= sim.shape[0]:
        raise UserError(f"caption image indices must lie in [0, {sim.shape[0]})")
    correct_IxT = owner[None, :] == np.arange(sim.shape[0])[:, None]
    if not correct_IxT.any(axis=1).all():
        raise UserError("every image needs at least one caption for image->text recall")
    best_I = np.where(correct_IxT, sim, -np.inf).max(axis=1)
    i2t_rank = (~correct_IxT & (sim >= best_I[:, None])).sum(axis=1)
    right_T = sim[owner, np.arange(sim.shape[1])]
    t2i_rank = (~correct_IxT & (sim >= right_T[None, :])).sum(axis=0)
    out = {}
    for k in ks:
        out[f"i2t_r{k}"] = float((i2t_rank < k).mean())
        out[f"t2i_r{k}"] = float((t2i_rank < k).mean())
    return out
