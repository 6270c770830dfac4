"""Swin Transformer (Liu et al. 2021): attention inside M x M windows, shifted every other
block, with a relative position bias, and patch merging between stages.

    images -> patches [B,H,W,C] -> stage 1 (blocks: W-MSA, SW-MSA, ...) -> merge (H/2, 2C)
           -> stage 2 -> ... -> norm -> {"tokens": [B,N,C'], "pooled": [B,C']}

Shifted windows (sec. 3.2): the grid is rolled by (-s, -s), s = M // 2, before it is cut into
windows, and back afterwards. The windows on the far edges then hold tokens that were not
neighbours in the image; `shift_mask` keeps them apart. `window_attention_reference` computes
the same block as full attention over all tokens with an [N, N] mask (pairs in the same
rolled window that were neighbours before the roll) and the same weights: the test holds the
windowed form to it.

The blocks here are Swin's own (norm, window attention, norm, MLP from layers.py), not the
shared block stack: its mixers see a 1-D sequence, and window attention needs the 2-D grid
and a per-block shift. A stage whose grid is no larger than the window attends over the
whole grid without a shift, as the reference implementation does.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxcourse.errors import ConfigError
from jaxcourse.models.layers import MLP, Norm, partitioned
from jaxcourse.models.vit import PatchEmbed, check_patch


@dataclasses.dataclass(frozen=True)
class SwinConfig:
    image_size: int = 32
    channels: int = 3
    patch_size: int = 2
    window: int = 4                # M: tokens per window side; must divide each stage's grid
    d_model: int = 32              # C of the first stage; doubles at every merge
    depths: tuple = (2, 2)         # blocks per stage (pairs of W-MSA and SW-MSA)
    heads: tuple = (2, 4)          # attention heads per stage
    mlp_ratio: int = 4
    num_classes: int = 10          # SwinClassifier's head; 0 = no head

    def __post_init__(self):
        object.__setattr__(self, "depths", tuple(self.depths))
        object.__setattr__(self, "heads", tuple(self.heads))
        if len(self.depths) != len(self.heads) or not self.depths:
            raise ConfigError(f"model.depths {self.depths} and model.heads {self.heads} need "
                            "one entry per stage")
        check_patch(self.image_size, self.image_size, self.patch_size)
        for i, (c, h) in enumerate(zip(self.stage_widths, self.heads)):
            if c % h:
                raise ConfigError(f"stage {i + 1}: width {c} is not divisible by {h} heads")
        for i, g in enumerate(self.stage_grids):
            check_window(g, g, self.window, f"stage {i + 1}")
            if i + 1 < len(self.depths) and g % 2:
                raise ConfigError(f"stage {i + 1}: a {g}x{g} grid cannot be merged 2x2")

    @property
    def stage_grids(self) -> tuple[int, ...]:
        g = self.image_size // self.patch_size
        return tuple(g // 2 ** i for i in range(len(self.depths)))

    @property
    def stage_widths(self) -> tuple[int, ...]:
        return tuple(self.d_model * 2 ** i for i in range(len(self.depths)))


def check_window(h: int, w: int, window: int, where: str = "") -> None:
    """One line (ConfigError: exit 2) when windows of `window` tokens do not tile an h x w
    patch grid (a grid no larger than the window is one window)."""
    if window < 1:
        raise ConfigError(f"window size must be >= 1, got {window}")
    if (h > window or w > window) and (h % window or w % window):
        at = f" ({where})" if where else ""
        raise ConfigError(f"window size {window} does not divide the patch grid {h}x{w}{at}")


def effective_window(h: int, w: int, window: int, shifted: bool) -> tuple[int, int]:
    """(window, shift) a block uses: the whole grid, unshifted, when it fits in one window."""
    if max(h, w) <= window:
        return max(h, w), 0
    return window, window // 2 if shifted else 0


def relative_index(window: int) -> np.ndarray:
    """[M*M, M*M] indices into the (2M-1)^2 relative-bias table (row-major (dy, dx))."""
    coords = np.stack(np.meshgrid(np.arange(window), np.arange(window), indexing="ij"), -1)
    coords = coords.reshape(-1, 2)
    rel = coords[:, None] - coords[None] + window - 1
    return rel[..., 0] * (2 * window - 1) + rel[..., 1]


def shift_mask(h: int, w: int, window: int, shift: int) -> np.ndarray:
    """[nW, M*M, M*M] booleans, True where two tokens of a rolled window may attend: both
    in the same region (the last `window - shift` and the wrapped `shift` rows / columns of
    the rolled grid are regions of their own)."""
    region = np.zeros((h, w), np.int32)
    cuts = lambda n: (slice(0, n - window), slice(n - window, n - shift), slice(n - shift, n))  # noqa: E731
    for i, rows in enumerate(cuts(h)):
        for j, cols in enumerate(cuts(w)):
            region[rows, cols] = 3 * i + j
    ids = partition(region[None, :, :, None], window)[0, :, :, 0]  # [nW, M*M]
    return ids[:, :, None] == ids[:, None, :]


def partition(x_BxHxWxC, window: int):
    """[B, H, W, ...] -> [B, nW, M*M, ...] windows in row-major order."""
    b, h, w = x_BxHxWxC.shape[:3]
    rest = x_BxHxWxC.shape[3:]
    x = x_BxHxWxC.reshape(b, h // window, window, w // window, window, *rest)
    x = jnp.moveaxis(x, 2, 3) if isinstance(x, jax.Array) else np.moveaxis(x, 2, 3)
    return x.reshape(b, (h // window) * (w // window), window * window, *rest)


def merge(windows_BxNWxMMxC, h: int, w: int, window: int):
    """The inverse of `partition`."""
    b, rest = windows_BxNWxMMxC.shape[0], windows_BxNWxMMxC.shape[3:]
    x = windows_BxNWxMMxC.reshape(b, h // window, w // window, window, window, *rest)
    return jnp.moveaxis(x, 3, 2).reshape(b, h, w, *rest)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside (shifted) windows, with a relative position bias."""
    n_head: int
    window: int
    shifted: bool = False

    @nn.compact
    def __call__(self, x_BxHxWxC):
        b, h, w, c = x_BxHxWxC.shape
        m, s = effective_window(h, w, self.window, self.shifted)
        d = c // self.n_head
        table = self.param("relative_bias", partitioned(nn.initializers.normal(0.02),
                                                        (None, "heads")),
                           ((2 * m - 1) ** 2, self.n_head))
        qkv_proj = nn.DenseGeneral((3, self.n_head, d), name="qkv", kernel_init=partitioned(
            nn.initializers.xavier_uniform(), ("embed", None, "heads", "head_dim")))
        x = jnp.roll(x_BxHxWxC, (-s, -s), axis=(1, 2)) if s else x_BxHxWxC
        qkv = partition(qkv_proj(x), m)                      # [B, nW, M*M, 3, heads, d]
        q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]
        logits = jnp.einsum("bwqhd,bwkhd->bwhqk", q, k) * d ** -0.5
        logits = logits + table[relative_index(m)].transpose(2, 0, 1)[None, None]
        if s:
            mask = shift_mask(h, w, m, s)[None, :, None]
            logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
        probs = jax.nn.softmax(logits, axis=-1)
        out = merge(jnp.einsum("bwhqk,bwkhd->bwqhd", probs, v), h, w, m)
        out = nn.DenseGeneral(c, axis=(-2, -1), name="proj", kernel_init=partitioned(
            nn.initializers.xavier_uniform(), ("heads", "head_dim", "embed")))(out)
        return jnp.roll(out, (s, s), axis=(1, 2)) if s else out


def window_attention_reference(params, x_BxHxWxC, n_head: int, window: int, shifted: bool):
    """The same as `WindowAttention` as full attention over all H*W tokens: token i may see
    token j when both fall in one window of the rolled grid and were within `window` rows
    and columns of each other before the roll (no wrap-around); the bias comes from their
    offset in the image."""
    b, h, w, c = x_BxHxWxC.shape
    m, s = effective_window(h, w, window, shifted)
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    rows, cols = rows.ravel(), cols.ravel()
    win = ((rows - s) % h) // m * (w // m) + ((cols - s) % w) // m
    dr, dc = rows[:, None] - rows[None], cols[:, None] - cols[None]
    mask_NxN = (win[:, None] == win[None]) & (np.abs(dr) < m) & (np.abs(dc) < m)
    index = (np.clip(dr, 1 - m, m - 1) + m - 1) * (2 * m - 1) + np.clip(dc, 1 - m, m - 1) + m - 1
    bias_HxNxN = params["relative_bias"][index].transpose(2, 0, 1)
    x = x_BxHxWxC.reshape(b, h * w, c)
    qkv = jnp.einsum("bnc,cthd->bnthd", x, params["qkv"]["kernel"]) + params["qkv"]["bias"]
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) * (c // n_head) ** -0.5 + bias_HxNxN[None]
    logits = jnp.where(mask_NxN[None, None], logits, jnp.finfo(logits.dtype).min)
    out = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, -1), v)
    out = jnp.einsum("bqhd,hdc->bqc", out, params["proj"]["kernel"]) + params["proj"]["bias"]
    return out.reshape(b, h, w, c)


class SwinBlock(nn.Module):
    n_head: int
    window: int
    shifted: bool
    mlp_ratio: int = 4

    @nn.compact
    def __call__(self, x_BxHxWxC):
        c = x_BxHxWxC.shape[-1]
        y = Norm("layernorm", name="attention_norm")(x_BxHxWxC)
        x = x_BxHxWxC + WindowAttention(self.n_head, self.window, self.shifted,
                                        name="attention")(y)
        y = Norm("layernorm", name="mlp_norm")(x)
        return x + MLP(c, self.mlp_ratio * c, use_bias=True, name="mlp")(y)


class PatchMerging(nn.Module):
    """2x2 neighbouring tokens -> one of twice the width: [B,H,W,C] -> [B,H/2,W/2,2C]."""

    @nn.compact
    def __call__(self, x_BxHxWxC):
        c = x_BxHxWxC.shape[-1]
        x = jnp.concatenate([x_BxHxWxC[:, 0::2, 0::2], x_BxHxWxC[:, 1::2, 0::2],
                             x_BxHxWxC[:, 0::2, 1::2], x_BxHxWxC[:, 1::2, 1::2]], -1)
        x = Norm("layernorm", name="norm")(x)
        return nn.Dense(2 * c, use_bias=False, name="reduction", kernel_init=partitioned(
            nn.initializers.xavier_uniform(), ("mlp", "embed")))(x)


class Swin(nn.Module):
    """images [B,H,W,C] -> {"tokens": [B, N, C_last] (last stage), "pooled": [B, C_last]}."""
    cfg: SwinConfig

    @nn.compact
    def __call__(self, images_BxHxWxC, *, train: bool = False):
        del train  # no dropout or batch statistics
        c = self.cfg
        b, h, w, _ = images_BxHxWxC.shape
        check_patch(h, w, c.patch_size)
        gh, gw = h // c.patch_size, w // c.patch_size
        x = PatchEmbed(c.d_model, c.patch_size, name="patch_embed")(images_BxHxWxC)
        x = x.reshape(b, gh, gw, c.d_model)
        for i, (depth, heads) in enumerate(zip(c.depths, c.heads)):
            if i:
                x = PatchMerging(name=f"merge_{i}")(x)
            check_window(x.shape[1], x.shape[2], c.window, f"stage {i + 1}")
            for j in range(depth):
                x = SwinBlock(heads, c.window, shifted=j % 2 == 1, mlp_ratio=c.mlp_ratio,
                              name=f"stage_{i}_block_{j}")(x)
        tokens = Norm("layernorm", name="final_norm")(x.reshape(b, -1, x.shape[-1]))
        return {"tokens": tokens, "pooled": tokens.mean(1)}


class SwinClassifier(nn.Module):
    cfg: SwinConfig

    @nn.compact
    def __call__(self, images_BxHxWxC, train: bool = False):
        pooled = Swin(self.cfg, name="swin")(images_BxHxWxC, train=train)["pooled"]
        return nn.Dense(self.cfg.num_classes, name="head")(pooled)
