"""A small convolutional autoencoder: the latent space of latent diffusion (Rombach et al. 2022).

Encoder: conv, then `downsamples` stride-2 convs (each halves the size), then a 1x1 conv to
`latent_channels`; the decoder mirrors it with nearest-neighbour upsampling. Images of
8x8x1 become 4x4x2 latents by default: half the numbers, a quarter of the positions, which
is what makes every U-Net convolution in latent space about 4x cheaper.

Training is plain reconstruction (mean squared error) plus a small penalty on the latent
magnitude, which keeps latents near unit scale for the diffusion model (the role of the
KL term of the paper's KL-regularised autoencoder, sec. 3.1, without the sampling).
"""
from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax.numpy as jnp

from jaxcourse.errors import UserError


@dataclasses.dataclass(frozen=True)
class AutoencoderConfig:
    image_size: int = 8
    channels: int = 1
    width: int = 32
    downsamples: int = 1
    latent_channels: int = 2
    groups: int = 8

    @property
    def latent_size(self) -> int:
        return self.image_size // 2 ** self.downsamples

    def validate(self) -> None:
        if self.image_size % 2 ** self.downsamples:
            raise UserError(f"autoencoder image_size={self.image_size} is not divisible by "
                            f"2**downsamples={2 ** self.downsamples}")


def _block(x, ch: int, groups: int):
    h = nn.Conv(ch, (3, 3))(nn.silu(nn.GroupNorm(math.gcd(groups, x.shape[-1]))(x)))
    h = nn.Conv(ch, (3, 3))(nn.silu(nn.GroupNorm(math.gcd(groups, ch))(h)))
    return h + (x if x.shape[-1] == ch else nn.Conv(ch, (1, 1))(x))


class Encoder(nn.Module):
    config: AutoencoderConfig

    @nn.compact
    def __call__(self, x_BxHxWxC):
        c = self.config
        h = nn.Conv(c.width, (3, 3))(x_BxHxWxC)
        for _ in range(c.downsamples):
            h = _block(h, c.width, c.groups)
            h = nn.Conv(c.width, (3, 3), strides=(2, 2))(h)
        h = _block(h, c.width, c.groups)
        return nn.Conv(c.latent_channels, (1, 1))(nn.silu(h))


class Decoder(nn.Module):
    config: AutoencoderConfig

    @nn.compact
    def __call__(self, z_BxhxwxL):
        c = self.config
        h = _block(nn.Conv(c.width, (3, 3))(z_BxhxwxL), c.width, c.groups)
        for _ in range(c.downsamples):  # nearest-neighbour 2x upsampling, then a conv.
            h = nn.Conv(c.width, (3, 3))(jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2))
            h = _block(h, c.width, c.groups)
        return nn.Conv(c.channels, (3, 3))(nn.silu(h))


class Autoencoder(nn.Module):
    """encode: images in [-1, 1] -> latents; decode: latents -> images; __call__: both."""
    config: AutoencoderConfig

    def setup(self):
        self.encoder = Encoder(self.config)
        self.decoder = Decoder(self.config)

    def encode(self, x_BxHxWxC):
        c = self.config
        if x_BxHxWxC.shape[1:] != (c.image_size, c.image_size, c.channels):
            raise UserError(f"autoencoder expects images [B,{c.image_size},{c.image_size},"
                            f"{c.channels}], got {list(x_BxHxWxC.shape)}")
        return self.encoder(x_BxHxWxC)

    def decode(self, z):
        return self.decoder(z)

    def __call__(self, x_BxHxWxC):
        z = self.encode(x_BxHxWxC)
        return self.decode(z), z
