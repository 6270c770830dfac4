"""Masked autoencoders (He et al. 2021, "Masked Autoencoders Are Scalable Vision Learners").

    1. patchify the image into N patches; shuffle each example's patches by argsort of
       uniform noise and keep the first N - round(r N) (r = 0.75): `random_masking`;
    2. the encoder (any module taking `keep_BxK`, e.g. models/vit.ViT) sees the kept
       patches only, positions added before the drop;
    3. a light decoder embeds the visible tokens, appends a shared mask token for every
       dropped patch, unshuffles them back to raster order (`restore`), adds fixed 2-D
       sin-cos positions and runs a few blocks of the shared `Stack`, then predicts pixels;
    4. the loss is the mean squared error on masked patches only (section 3, "Reconstruction
       target"), against per-patch normalised pixels (x - mean) / sqrt(var + eps) when
       `norm_pix` (the paper's better variant, table 1c).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxcourse.errors import UserError
from jaxcourse.models.block import Stack
from jaxcourse.models import vit
from jaxcourse.models.transformer import GPTConfig, final_norm
# One patchify for the ViT's reshape path and MAE's targets (re-exported for tests).
from jaxcourse.models.vit import check_patch, patchify, token_features, unpatchify  # noqa: F401
from jaxcourse.train import Task


def check_mask_ratio(ratio: float, n_patches: int | None = None) -> None:
    if not 0.0 <= ratio < 1.0:
        raise UserError(f"mask_ratio={ratio} must be in [0, 1)")
    if n_patches is not None and n_patches - round(ratio * n_patches) < 1:
        raise UserError(f"mask_ratio={ratio} leaves no visible patch of {n_patches}")


@dataclasses.dataclass(frozen=True)
class MAEConfig:
    patch_size: int = 4
    mask_ratio: float = 0.75
    norm_pix: bool = True
    decoder_d_model: int = 64
    decoder_layers: int = 2
    decoder_heads: int = 4
    dtype: str = "float32"  # the decoder's compute dtype (the encoder's model.dtype)

    def __post_init__(self):
        check_mask_ratio(self.mask_ratio)
        for name in ("patch_size", "decoder_d_model", "decoder_layers", "decoder_heads"):
            if getattr(self, name) < 1:
                raise UserError(f"mae.{name} must be >= 1, got {getattr(self, name)}")
        if self.decoder_d_model % self.decoder_heads:
            raise UserError(f"mae.decoder_d_model={self.decoder_d_model} is not divisible by "
                            f"decoder_heads={self.decoder_heads}")

    def decoder(self, n_patches: int) -> GPTConfig:
        """The decoder's blocks: bidirectional, LayerNorm, positions added by the decoder."""
        return GPTConfig(context=n_patches, n_layer=self.decoder_layers,
                         n_head=self.decoder_heads, d_model=self.decoder_d_model,
                         norm="layernorm", pos="none", attention="einsum", vocab_size=1,
                         dtype=self.dtype)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def random_masking(rng, batch: int, n_patches: int, ratio: float) -> dict:
    """Per-example shuffle by argsort of noise (MAE section 3, "Masking").

    Returns keep [B, K] (the visible patches' indices, K = N - round(ratio N)), restore
    [B, N] (argsort of the shuffle: gathering [visible, mask tokens] with it gives raster
    order) and mask [B, N] (1 = hidden, 0 = visible) in raster order.
    """
    check_mask_ratio(ratio, n_patches)
    k = n_patches - round(ratio * n_patches)
    shuffle_BxN = jnp.argsort(jax.random.uniform(rng, (batch, n_patches)), axis=1)
    restore_BxN = jnp.argsort(shuffle_BxN, axis=1)
    shuffled_mask = jnp.broadcast_to(jnp.arange(n_patches) >= k, (batch, n_patches))
    mask_BxN = jnp.take_along_axis(shuffled_mask, restore_BxN, axis=1).astype(jnp.float32)
    return {"keep": shuffle_BxN[:, :k], "restore": restore_BxN, "mask": mask_BxN}


@jax.jit
def normalized_targets(patches_BxNxP, eps: float = 1e-6):
    """Each patch's pixels minus their mean, over sqrt(var + eps) (MAE's norm_pix_loss)."""
    mean = patches_BxNxP.mean(-1, keepdims=True)
    var = patches_BxNxP.var(-1, keepdims=True)
    return (patches_BxNxP - mean) / jnp.sqrt(var + eps)


@jax.jit
def mae_loss(pred_BxNxP, target_BxNxP, mask_BxN):
    """Mean squared error per patch, averaged over the masked patches only."""
    per_patch_BxN = ((pred_BxNxP - target_BxNxP) ** 2).mean(-1)
    return (per_patch_BxN * mask_BxN).sum() / jnp.maximum(mask_BxN.sum(), 1.0)


def sincos_2d(gh: int, gw: int, dim: int) -> np.ndarray:
    """Fixed 2-D sin-cos positions [gh*gw, dim] for the decoder: vit.sincos_2d, flattened."""
    if dim % 4:
        raise UserError(f"2-D sin-cos positions need a width divisible by 4, got {dim}")
    return vit.sincos_2d(gh, gw, dim).reshape(gh * gw, dim)


class MAE(nn.Module):
    """encoder + light decoder: (images, keep, restore) -> predicted patches [B, N, p*p*C].

    `encoder(images, train=..., keep_BxK=keep)` returns tokens [B, P + K, D] (or {"tokens":
    ...}): P prefix tokens (a class token) first, then the K visible patches in `keep` order.
    """
    encoder: nn.Module
    cfg: MAEConfig

    @nn.compact
    def __call__(self, images_BxHxWxC, keep_BxK, restore_BxN, *, train: bool = False):
        c = self.cfg
        b, h, w, ch = images_BxHxWxC.shape
        check_patch(h, w, c.patch_size)
        gh, gw = h // c.patch_size, w // c.patch_size
        n, k = gh * gw, keep_BxK.shape[1]
        tokens = token_features(self.encoder(images_BxHxWxC, train=train, keep_BxK=keep_BxK))
        visible_BxKxE = tokens[:, tokens.shape[1] - k:]  # drop prefix tokens
        dc = c.decoder(n)
        dtype = dc.compute_dtype
        x_BxKxD = nn.Dense(dc.d_model, dtype=dtype, name="decoder_embed")(visible_BxKxE)
        mask_token = self.param("mask_token", nn.initializers.normal(0.02), (1, 1, dc.d_model))
        x_BxNxD = jnp.concatenate(
            [x_BxKxD, jnp.broadcast_to(mask_token, (b, n - k, dc.d_model)).astype(dtype)],
            axis=1)
        x_BxNxD = jnp.take_along_axis(x_BxNxD, restore_BxN[..., None], axis=1)
        x_BxNxD = x_BxNxD + jnp.asarray(sincos_2d(gh, gw, dc.d_model), dtype)[None]
        x_BxNxD, _ = Stack(dc, causal=False, deterministic=not train, name="decoder")(
            x_BxNxD, jnp.arange(n))
        x_BxNxD = final_norm(dc, x_BxNxD)
        return nn.Dense(c.patch_size ** 2 * ch, dtype=dtype, name="decoder_pred")(x_BxNxD)


def targets(images_BxHxWxC, cfg: MAEConfig):
    patches = patchify(images_BxHxWxC, cfg.patch_size)
    return normalized_targets(patches) if cfg.norm_pix else patches


@functools.partial(jax.jit, static_argnums=3)
def reconstruction(images_BxHxWxC, pred_BxNxP, mask_BxN, cfg: MAEConfig) -> dict:
    """Images for a figure: the masked input (hidden patches zero), the prediction in pixel
    space (norm_pix predictions take each true patch's mean and std, as the paper's figures
    do), and the prediction pasted into the visible patches."""
    b, h, w, c = images_BxHxWxC.shape
    p = cfg.patch_size
    patches = patchify(images_BxHxWxC, p)
    if cfg.norm_pix:
        mean = patches.mean(-1, keepdims=True)
        std = jnp.sqrt(patches.var(-1, keepdims=True) + 1e-6)
        pred_BxNxP = pred_BxNxP * std + mean
    m = mask_BxN[..., None]
    back = lambda x: unpatchify(x, p, h, w, c)  # noqa: E731
    return {"masked": back(patches * (1 - m)), "prediction": back(pred_BxNxP),
            "pasted": back(patches * (1 - m) + pred_BxNxP * m)}


def mae_task(model: MAE) -> Task:
    """Self-supervised MAE pretraining for the shared loop; batches {"image": [B,H,W,C]}."""
    cfg: Any = model.cfg

    def masking(rng, images):
        b, h, w, _ = images.shape
        check_patch(h, w, cfg.patch_size)
        return random_masking(rng, b, (h // cfg.patch_size) * (w // cfg.patch_size),
                              cfg.mask_ratio)

    def init(rng, batch):
        m = masking(rng, batch["image"])
        variables = dict(model.init({"params": rng, "dropout": rng}, batch["image"],
                                    m["keep"], m["restore"]))
        return variables.pop("params"), variables

    def loss(params, model_state, batch, rng, train):
        k_mask, k_drop = jax.random.split(rng)
        images = batch["image"]
        m = masking(k_mask, images)
        pred = model.apply({"params": params, **model_state}, images, m["keep"],
                           m["restore"], train=train, rngs={"dropout": k_drop})
        value = mae_loss(pred.astype(jnp.float32), targets(images, cfg), m["mask"])
        return value, ({"mae_loss": value}, model_state)

    return Task(init=init, loss=loss)
