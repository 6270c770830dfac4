"""Vision Transformer (Dosovitskiy et al. 2021): patches -> tokens -> the shared encoder.

    images [B,H,W,C] -> patch embedding [B,N,D] (+ positions) -> [class token] ->
    Encoder (models/encoder_decoder.py: the bidirectional block stack, no attention mask)
    -> {"tokens": [B,T,D], "pooled": [B,D]}

- Patchify as a strided conv or as a reshape + matmul (`patchify`): one kernel parameter
  [p, p, C, D] serves both, and both give the same tokens (tests/test_vit.py).
- Pooling: the class token's output (`pool="cls"`) or the mean of the patch tokens ("gap").
- Positions: a learned [gh, gw, D] table, bilinearly resized when the image has another
  resolution than the config's (`interpolate_positions`, as when fine-tuning at a higher
  resolution, sec. 3.2), or fixed 2-D sin-cos (MAE's `get_2d_sincos_pos_embed`), computed
  for whatever grid the image gives.
- `keep_BxK` (optional) keeps only those patch tokens after positions are added: MAE's
  encoder sees the visible patches alone.

`ViT` is the image tower CLIP, MAE and DINO build on; `ViTClassifier` adds a linear head
(its encoder's parameters sit under "vit", so pretrained ones drop in for fine-tuning).
"""
from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxcourse.errors import ConfigError
from jaxcourse.models.encoder_decoder import Encoder
from jaxcourse.models.layers import NORMS, partitioned
from jaxcourse.models.transformer import DTYPES, GPTConfig

PATCHIFY = ("conv", "reshape")
POOLS = ("cls", "gap")
POSITIONS = ("learned", "sincos")


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """Hyper-parameters of a ViT; the blocks are a non-causal GPTConfig stack (`blocks`)."""
    image_size: int = 32           # Height = width of the training images, in pixels.
    channels: int = 3
    patch_size: int = 4            # Pixels per patch side; must divide image_size.
    patchify: str = "conv"         # conv | reshape (the same function, two layouts)
    pool: str = "cls"              # cls: class token | gap: mean of the patch tokens
    pos: str = "learned"           # learned (resized to other grids) | sincos (2-D, fixed)
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 64
    d_ff: int = 0                  # 0: 4 * d_model.
    dropout: float = 0.0
    norm: str = "layernorm"        # layernorm | rmsnorm
    bias: bool = True              # Biases in the attention and MLP projections.
    attention: str = "xla"         # einsum | xla | cudnn | pallas (attention maps: einsum)
    dtype: str = "float32"         # Compute dtype (bfloat16 on GPUs); parameters stay float32.
    num_classes: int = 10          # ViTClassifier's head; 0 = no head.

    def __post_init__(self):
        for name, value, choices in (("patchify", self.patchify, PATCHIFY),
                                     ("pool", self.pool, POOLS), ("pos", self.pos, POSITIONS),
                                     ("norm", self.norm, NORMS)):
            if value not in choices:
                raise ConfigError(f"model.{name}={value!r} is not one of {', '.join(choices)}")
        for name in ("image_size", "channels", "patch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        check_patch(self.image_size, self.image_size, self.patch_size)
        if self.pos == "sincos" and self.d_model % 4:
            raise ConfigError(f"model.pos='sincos' needs d_model divisible by 4, got "
                            f"{self.d_model}")
        if self.num_classes < 0:
            raise ConfigError(f"model.num_classes must be >= 0, got {self.num_classes}")
        self.blocks(self.n_tokens)  # the block settings are checked by GPTConfig

    @property
    def grid(self) -> int:
        """Patches per side at the configured resolution."""
        return self.image_size // self.patch_size

    @property
    def n_prefix(self) -> int:
        """Tokens before the patches: 1 (the class token) or 0."""
        return 1 if self.pool == "cls" else 0

    @property
    def n_tokens(self) -> int:
        return self.grid ** 2 + self.n_prefix

    def blocks(self, n_tokens: int) -> GPTConfig:
        """The encoder's GPTConfig for sequences of n_tokens (positions are added here)."""
        return GPTConfig(vocab_size=1, context=n_tokens, n_layer=self.n_layer,
                         n_head=self.n_head, d_model=self.d_model, d_ff=self.d_ff,
                         dropout=self.dropout, norm=self.norm, pos="none", bias=self.bias,
                         attention=self.attention, dtype=self.dtype)


def check_patch(h: int, w: int, p: int) -> None:
    """One line (ConfigError: exit 2) when patches of p pixels do not tile an h x w image."""
    if h % p or w % p:
        raise ConfigError(f"patch size {p} does not divide the image size {h}x{w}")


def patchify(images_BxHxWxC, p: int):
    """[B, H, W, C] -> [B, N, p*p*C], patches in row-major grid order, each flattened as
    (row in patch, column in patch, channel)."""
    b, h, w, c = images_BxHxWxC.shape
    check_patch(h, w, p)
    x = images_BxHxWxC.reshape(b, h // p, p, w // p, p, c)
    return jnp.einsum("bgphqc->bghpqc", x).reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(patches_BxNxP, p: int, h: int, w: int, c: int):
    """The inverse of `patchify`: [B, N, p*p*C] -> [B, H, W, C]."""
    b = patches_BxNxP.shape[0]
    x = patches_BxNxP.reshape(b, h // p, w // p, p, p, c)
    return jnp.einsum("bghpqc->bgphqc", x).reshape(b, h, w, c)


def pooled_features(out):
    """An image encoder's features [B, D]: out["pooled"] of a ViT-style dict, the mean over
    tokens of a [B, T, D] output, or a [B, D] output as it is (CLIP, DINO, probes)."""
    if isinstance(out, dict):
        return out["pooled"]
    return out.mean(axis=1) if out.ndim == 3 else out


def token_features(out):
    """An image encoder's tokens [B, T, D]: out["tokens"] of a ViT-style dict, or out (MAE)."""
    return out["tokens"] if isinstance(out, dict) else out


def sincos_1d(positions, dim: int):
    """[n] positions -> [n, dim]: sin of dim/2 frequencies 1/10000^(i/(dim/2)), then cos."""
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2))
    angles = np.asarray(positions, np.float64)[:, None] * omega[None]
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_2d(gh: int, gw: int, dim: int) -> np.ndarray:
    """[gh, gw, dim] fixed positions: the first dim/2 channels encode the row, the rest the
    column (MAE, He et al. 2022)."""
    rows = sincos_1d(np.arange(gh), dim // 2)    # [gh, dim/2]
    cols = sincos_1d(np.arange(gw), dim // 2)    # [gw, dim/2]
    table = np.concatenate([np.repeat(rows[:, None], gw, 1), np.repeat(cols[None], gh, 0)], -1)
    return table.astype(np.float32)


def interpolate_positions(table_GxGxD, gh: int, gw: int):
    """A [G, G', D] position table resized to [gh, gw, D] (bilinear; unchanged at its own
    size)."""
    if table_GxGxD.shape[:2] == (gh, gw):
        return table_GxGxD
    return jax.image.resize(table_GxGxD, (gh, gw, table_GxGxD.shape[-1]), "bilinear")


class PatchEmbed(nn.Module):
    """Patches -> D features with one [p, p, C, D] kernel, as a conv or a reshape + matmul."""
    d_model: int
    patch_size: int
    mode: str = "conv"
    dtype: jnp.dtype = jnp.float32  # compute dtype of the patches, kernel and output

    @nn.compact
    def __call__(self, images_BxHxWxC):
        p, c = self.patch_size, images_BxHxWxC.shape[-1]
        b, h, w, _ = images_BxHxWxC.shape
        check_patch(h, w, p)
        fan_in = p * p * c
        kernel = self.param("kernel", partitioned(nn.initializers.lecun_normal(
            in_axis=(0, 1, 2), out_axis=3), (None, None, None, "embed")),
            (p, p, c, self.d_model))
        bias = self.param("bias", partitioned(nn.initializers.zeros, ("embed",)),
                          (self.d_model,))
        x, kernel = images_BxHxWxC.astype(self.dtype), kernel.astype(self.dtype)
        bias = bias.astype(self.dtype)
        if self.mode == "conv":
            y = jax.lax.conv_general_dilated(x, kernel, (p, p), "VALID",
                                             dimension_numbers=("NHWC", "HWIO", "NHWC"))
            y_BxNxD = y.reshape(b, -1, self.d_model)
        else:
            y_BxNxD = patchify(x, p) @ kernel.reshape(fan_in, self.d_model)
        return y_BxNxD + bias


class ViT(nn.Module):
    """images [B,H,W,C] -> {"tokens": [B,T,D] (class token first with pool="cls"),
    "pooled": [B,D]}. The image may have another resolution than the config's."""
    cfg: ViTConfig

    @nn.compact
    def __call__(self, images_BxHxWxC, *, train: bool = False, keep_BxK=None):
        c = self.cfg
        b, h, w, _ = images_BxHxWxC.shape
        check_patch(h, w, c.patch_size)
        gh, gw = h // c.patch_size, w // c.patch_size
        dtype = DTYPES[c.dtype]
        x_BxNxD = PatchEmbed(c.d_model, c.patch_size, c.patchify, dtype, name="patch_embed")(
            images_BxHxWxC)
        if c.pos == "learned":
            table = self.param("pos_embedding", partitioned(
                nn.initializers.normal(stddev=0.02), (None, None, "embed")),
                (c.grid, c.grid, c.d_model))
            pos_NxD = interpolate_positions(table, gh, gw).reshape(gh * gw, c.d_model)
        else:
            pos_NxD = jnp.asarray(sincos_2d(gh, gw, c.d_model)).reshape(gh * gw, c.d_model)
        x_BxNxD = x_BxNxD + pos_NxD[None].astype(dtype)
        if keep_BxK is not None:  # MAE: the encoder sees the kept (visible) patches only
            x_BxNxD = jnp.take_along_axis(x_BxNxD, keep_BxK[..., None], axis=1)
        if c.pool == "cls":
            cls = self.param("cls", partitioned(nn.initializers.zeros, (None, None, "embed")),
                             (1, 1, c.d_model))
            x_BxNxD = jnp.concatenate(
                [jnp.broadcast_to(cls, (b, 1, c.d_model)).astype(dtype), x_BxNxD], 1)
        tokens_BxTxD = Encoder(c.blocks(x_BxNxD.shape[1]), name="encoder")(
            embeddings_BxSxD=x_BxNxD, train=train)
        pooled = tokens_BxTxD[:, 0] if c.pool == "cls" else tokens_BxTxD.mean(1)
        return {"tokens": tokens_BxTxD, "pooled": pooled}


class ViTClassifier(nn.Module):
    """A ViT and a linear head on its pooled features: images -> logits [B, num_classes]."""
    cfg: ViTConfig

    @nn.compact
    def __call__(self, images_BxHxWxC, train: bool = False):
        if self.cfg.num_classes < 1:
            raise ConfigError("ViTClassifier needs model.num_classes >= 1")
        pooled = ViT(self.cfg, name="vit")(images_BxHxWxC, train=train)["pooled"]
        return nn.Dense(self.cfg.num_classes, name="head", kernel_init=partitioned(
            nn.initializers.zeros, ("embed", None)))(pooled)


def vit_config(section, **overrides) -> ViTConfig:
    """A ViTConfig from a config section, naming unknown keys."""
    values = dict(section.to_dict() if hasattr(section, "to_dict") else section)
    values.update(overrides)
    fields = {f.name for f in dataclasses.fields(ViTConfig)}
    unknown = set(values) - fields
    if unknown:
        raise ConfigError(f"unknown ViT model keys: {', '.join(sorted(unknown))}; known: "
                        f"{', '.join(sorted(fields))}")
    return ViTConfig(**values)


def attention_maps(cfg: ViTConfig, vit_params, images_BxHxWxC):
    """Attention probabilities of every layer, [L, B, H, T, T] (einsum attention)."""
    return _attention_maps(dataclasses.replace(cfg, attention="einsum"), vit_params,
                           images_BxHxWxC)


@functools.partial(jax.jit, static_argnums=0)
def _attention_maps(cfg: ViTConfig, vit_params, images_BxHxWxC):
    _, state = ViT(cfg).apply({"params": vit_params}, images_BxHxWxC,
                              mutable=["intermediates"])
    blocks = state["intermediates"]["encoder"]["blocks"]
    return jnp.stack([blocks[f"layer_{i}"]["attention"]["attention_probs"][0]
                      for i in range(cfg.n_layer)])


def attention_rollout(maps_LxBxHxTxT):
    """Abnar & Zuidema 2020: head-averaged attention plus the residual, multiplied through
    the layers; [B, T, T], row t = how much each input token reaches output token t."""
    a = maps_LxBxHxTxT.mean(2)
    eye = jnp.eye(a.shape[-1])
    a = (a + eye) / 2
    a = a / a.sum(-1, keepdims=True)
    out = a[0]
    for layer in a[1:]:
        out = layer @ out
    return out
