"""U-Net noise predictor for diffusion (Ho et al. 2020, appendix B; Nichol & Dhariwal 2021).

Shape of the network, for `UNetConfig(image_size=8, width=32, width_mults=(1, 2))`:

    x [B,8,8,C] -> conv -> level 0 (8x8, 32 ch) -> down -> level 1 (4x4, 64 ch, attention)
                -> middle (res, attention, res) -> level 1 up -> up -> level 0 up -> conv -> [B,8,8,C]

Each level holds `blocks` residual blocks; the up path has one more block per level and
concatenates the matching down-path activation before each (the U-Net skips). The diffusion
time t enters every residual block through a sinusoidal embedding and an MLP; a class label,
when the model is conditional, is an embedding added to the time embedding. Label index
`num_classes` is the "no label" token that classifier-free guidance trains and samples with.
"""
from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxcourse.errors import UserError


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    image_size: int = 8
    channels: int = 1               # image channels in and out.
    width: int = 32                 # channels at full resolution.
    width_mults: tuple[int, ...] = (1, 2)  # one level per entry; each level halves the size.
    blocks: int = 1                 # residual blocks per level on the down path.
    attn_sizes: tuple[int, ...] = (4,)  # spatial sizes (e.g. 4 = 4x4) that get self-attention.
    heads: int = 4
    num_classes: int = 10           # 0 = unconditional.
    dropout: float = 0.0
    groups: int = 8                 # GroupNorm groups (capped at the channel count).

    def validate(self) -> None:
        down = 2 ** (len(self.width_mults) - 1)
        if self.image_size % down:
            raise UserError(f"unet image_size={self.image_size} must be divisible by {down} "
                            f"for {len(self.width_mults)} levels")
        for mult in self.width_mults:
            if (self.width * mult) % self.heads:
                raise UserError(f"unet width {self.width * mult} is not divisible by "
                                f"heads={self.heads}")


def timestep_embedding(t_B, dim: int, max_period: float = 10_000.0):
    """Sinusoidal embedding of (possibly fractional) timesteps, as in the Transformer."""
    half = dim // 2
    freqs_H = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args_BxH = t_B.astype(jnp.float32)[:, None] * freqs_H[None, :]
    return jnp.concatenate([jnp.sin(args_BxH), jnp.cos(args_BxH)], axis=-1)


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=math.gcd(groups, channels))


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with the time embedding added in between (a FiLM shift)."""
    out_ch: int
    groups: int
    dropout: float

    @nn.compact
    def __call__(self, x_BxHxWxC, emb_BxE, train: bool):
        h = nn.silu(_norm(x_BxHxWxC.shape[-1], self.groups)(x_BxHxWxC))
        h = nn.Conv(self.out_ch, (3, 3))(h)
        h = h + nn.Dense(self.out_ch)(nn.silu(emb_BxE))[:, None, None, :]
        h = nn.silu(_norm(self.out_ch, self.groups)(h))
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        # Zero-initialised last conv: every block starts as the identity, which keeps deep
        # U-Nets trainable from step 0 (the DDPM reference implementation does the same).
        h = nn.Conv(self.out_ch, (3, 3), kernel_init=nn.initializers.zeros)(h)
        if x_BxHxWxC.shape[-1] != self.out_ch:
            x_BxHxWxC = nn.Conv(self.out_ch, (1, 1))(x_BxHxWxC)
        return x_BxHxWxC + h


class Attention(nn.Module):
    """Multi-head self-attention over the H*W positions of a low-resolution feature map."""
    heads: int
    groups: int

    @nn.compact
    def __call__(self, x_BxHxWxC):
        b, hh, ww, c = x_BxHxWxC.shape
        d = c // self.heads
        h = _norm(c, self.groups)(x_BxHxWxC).reshape(b, hh * ww, c)
        qkv = nn.DenseGeneral((3, self.heads, d))(h)
        q_BxLxNxD, k_BxLxNxD, v_BxLxNxD = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        logits_BxNxLxL = jnp.einsum("blnd,bmnd->bnlm", q_BxLxNxD, k_BxLxNxD) / math.sqrt(d)
        probs = jax.nn.softmax(logits_BxNxLxL.astype(jnp.float32), axis=-1).astype(h.dtype)
        out_BxLxNxD = jnp.einsum("bnlm,bmnd->blnd", probs, v_BxLxNxD)
        out = nn.DenseGeneral(c, axis=(-2, -1), kernel_init=nn.initializers.zeros)(out_BxLxNxD)
        return x_BxHxWxC + out.reshape(b, hh, ww, c)


class UNet(nn.Module):
    """eps (or v) prediction network: (x_t [B,H,W,C], t [B], label [B] or None) -> [B,H,W,C]."""
    config: UNetConfig

    @nn.compact
    def __call__(self, x_BxHxWxC, t_B, label_B=None, train: bool = False):
        c = self.config
        if x_BxHxWxC.ndim != 4 or x_BxHxWxC.shape[1:] != (c.image_size, c.image_size,
                                                           c.channels):
            raise UserError(f"unet expects images of shape [B,{c.image_size},{c.image_size},"
                            f"{c.channels}], got {list(x_BxHxWxC.shape)}")
        x_BxHxWxC = nn.with_logical_constraint(x_BxHxWxC, ("batch", None, None, None))
        emb_dim = 4 * c.width
        emb = timestep_embedding(t_B, c.width)
        emb = nn.Dense(emb_dim)(nn.silu(nn.Dense(emb_dim)(emb)))
        if c.num_classes:
            if label_B is None:  # Unconditional call of a conditional model.
                label_B = jnp.full(t_B.shape, c.num_classes, jnp.int32)
            emb = emb + nn.Embed(c.num_classes + 1, emb_dim)(label_B)

        def level(h, ch):
            h = ResBlock(ch, c.groups, c.dropout)(h, emb, train)
            if h.shape[1] in c.attn_sizes:
                h = Attention(c.heads, c.groups)(h)
            return h

        h = nn.Conv(c.width, (3, 3))(x_BxHxWxC)
        skips = [h]
        for i, mult in enumerate(c.width_mults):
            for _ in range(c.blocks):
                h = level(h, c.width * mult)
                skips.append(h)
            if i < len(c.width_mults) - 1:
                h = nn.Conv(h.shape[-1], (3, 3), strides=(2, 2))(h)
                skips.append(h)
        h = ResBlock(h.shape[-1], c.groups, c.dropout)(h, emb, train)
        h = Attention(c.heads, c.groups)(h)
        h = ResBlock(h.shape[-1], c.groups, c.dropout)(h, emb, train)
        for i, mult in reversed(list(enumerate(c.width_mults))):
            for _ in range(c.blocks + 1):
                h = level(jnp.concatenate([h, skips.pop()], axis=-1), c.width * mult)
            if i > 0:
                b, hh, ww, ch = h.shape
                h = jax.image.resize(h, (b, 2 * hh, 2 * ww, ch), "nearest")
                h = nn.Conv(ch, (3, 3))(h)
        h = nn.silu(_norm(h.shape[-1], c.groups)(h))
        out = nn.Conv(c.channels, (3, 3), kernel_init=nn.initializers.zeros)(h)
        return nn.with_logical_constraint(out, ("batch", None, None, None))
