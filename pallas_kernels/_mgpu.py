"""Shared pieces of the Mosaic GPU kernels: the swizzled SMEM layout wgmma and TMA read, and
the store of one register tile through SMEM and TMA."""
import functools

import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu


def transforms(minor: int, dtype):
    """SMEM layout of a wgmma / TMA tile: (8, swizzle) tiles, swizzled by the widest that fits."""
    itemsize = jnp.dtype(dtype).itemsize
    swizzle = plgpu.find_swizzle(minor * itemsize * 8)
    return (plgpu.TilingTransform((8, swizzle // itemsize)), plgpu.SwizzleTransform(swizzle))


def store_tile(value, gmem_tile):
    """Registers -> swizzled SMEM -> TMA store of one whole output tile (no masked stores)."""
    @functools.partial(pl.run_scoped, smem=plgpu.SMEM(
        value.shape, gmem_tile.dtype, transforms=transforms(value.shape[1], gmem_tile.dtype)))
    def _(smem):
        smem[...] = value.astype(smem.dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(smem, gmem_tile)
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
