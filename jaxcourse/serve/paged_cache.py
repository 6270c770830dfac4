"""A paged KV cache (Kwon et al. 2023, "vLLM / PagedAttention", section 4.1).

Keys and values live in fixed-size blocks of one pool per layer; a sequence owns a list of
blocks (its block table), allocated as it grows and freed when it finishes, so memory is
spent on tokens that exist rather than on `context` positions per slot.

    pool  {"k", "v": L arrays [num_blocks, K, block_size, D]}   (one pool per layer)
    table [slots, blocks_per_slot] int32                        (0 = the scratch block)

Block 0 is never handed out: it is the scratch block that unused table entries point at and
padding positions are written to, so every gather and scatter has a static shape and never
needs a branch. Whatever it holds sits at positions past a sequence's length, which the
causal mask hides.

`gather_layer` turns the slots' blocks of one layer into the dense heads-major [S, K, P, D]
layout the model's own attention mixer reads (models/attention.py); `write_token` /
`write_prompt` scatter the keys and values the model produced back into the pool.
`BlockAllocator` is the host-side free list. The layers' pools are separate arrays, not one
stacked [L, ...] array: XLA merges the per-layer gathers of a stacked pool into one gather
of every layer's blocks followed by per-layer slices, which writes each view twice. Blocks
are heads-major ([K, block_size, D]) so that the view's transpose moves whole blocks of a
head. In a profile of one decode chunk (32 slots, 128 positions, 8 steps, a 4x256 GPT) the
views took 14-18 ms in two passes before (of a 37-40 ms chunk), 9 ms in one now (of 34 ms).
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from jaxcourse.errors import UserError

SCRATCH = 0  # The block unused table entries point at.


@dataclasses.dataclass(frozen=True)
class PagedLayout:
    """Sizes of the pool: `num_blocks` blocks (block 0 included) of `block_size` tokens."""
    n_layer: int
    kv_heads: int
    head_dim: int
    context: int
    block_size: int = 16
    num_blocks: int = 0   # 0: enough for every slot to hold a whole context, plus scratch.
    slots: int = 8

    def __post_init__(self):
        if self.block_size < 1 or self.slots < 1:
            raise UserError(f"serve: block_size={self.block_size} and slots={self.slots} "
                            "must be positive")
        if self.num_blocks == 0:
            object.__setattr__(self, "num_blocks", self.slots * self.blocks_per_slot + 1)
        if self.num_blocks < self.blocks_per_slot + 1:
            raise UserError(f"serve: num_blocks={self.num_blocks} cannot hold one sequence "
                            f"of the context {self.context} ({self.blocks_per_slot} blocks "
                            f"of {self.block_size} + the scratch block)")

    @property
    def blocks_per_slot(self) -> int:
        """Table width: blocks of one sequence as long as the context."""
        return -(-self.context // self.block_size)

    @property
    def view_length(self) -> int:
        """Positions of a slot's dense view (the context rounded up to whole blocks)."""
        return self.blocks_per_slot * self.block_size

    def blocks_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.block_size)


def init_pool(layout: PagedLayout, dtype) -> dict:
    shape = (layout.num_blocks, layout.kv_heads, layout.block_size, layout.head_dim)
    return {name: [jnp.zeros(shape, dtype) for _ in range(layout.n_layer)]
            for name in ("k", "v")}


def gather_layer(pool: dict, table_SxM, layer: int) -> dict:
    """Dense views {"k", "v": [S, K, M * block_size, D]} of the slots' blocks in `layer`,
    heads-major like the attention mixer's cache."""
    def one(pools):
        _, kh, bs, d = pools[layer].shape
        s, m = table_SxM.shape
        view = jnp.take(pools[layer], table_SxM.reshape(-1), axis=0)   # [S * M, K, bs, D]
        return jnp.swapaxes(view.reshape(s, m, kh, bs, d), 1, 2).reshape(s, kh, m * bs, d)
    return {name: one(pool[name]) for name in pool}


def gather(pool: dict, table_SxM) -> dict:
    """Every layer's views, stacked: {"k", "v": [L, S, K, M * block_size, D]}."""
    views = [gather_layer(pool, table_SxM, i) for i in range(len(pool["k"]))]
    return {name: jnp.stack([v[name] for v in views]) for name in pool}


def write_token(pool: dict, table_SxM, positions_S, kv: dict, valid_S=None) -> dict:
    """Writes one token per row, kv {"k", "v": [L, S, K, D]}, at its position; rows where
    `valid_S` is False go to the scratch block."""
    bs = pool["k"][0].shape[2]
    blocks_S = jnp.take_along_axis(table_SxM, (positions_S // bs)[:, None], axis=1)[:, 0]
    if valid_S is not None:
        blocks_S = jnp.where(valid_S, blocks_S, SCRATCH)
    offsets_S = positions_S % bs
    return {name: [p.at[blocks_S, :, offsets_S].set(kv[name][i].astype(p.dtype))
                   for i, p in enumerate(pool[name])] for name in pool}


def write_prompt(pool: dict, table_BxM, lengths_B, kv: dict) -> dict:
    """Writes each row's first `lengths_B[b]` positions, kv {"k", "v": [L, B, T, K, D]} (T a
    padded bucket length); the padding goes to the scratch block (a row of length 0 is
    padding only)."""
    bs = pool["k"][0].shape[2]
    t, m = kv["k"].shape[2], table_BxM.shape[1]
    pos_T = jnp.arange(t)
    blocks_BxT = jnp.where(pos_T < lengths_B[:, None],
                           table_BxM[:, jnp.minimum(pos_T // bs, m - 1)], SCRATCH)
    return {name: [p.at[blocks_BxT, :, pos_T % bs].set(kv[name][i].astype(p.dtype))
                   for i, p in enumerate(pool[name])] for name in pool}


class BlockAllocator:
    """The free list of blocks 1 .. num_blocks-1, with reservations.

    A sequence reserves the blocks its longest possible continuation needs when it is
    admitted and takes them one by one as it grows, so a running sequence never finds the
    pool empty (no preemption); finishing early returns both what it took and what it had
    reserved."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, SCRATCH, -1))  # pop() hands out 1, 2, ...
        self._reserved = 0

    @property
    def free(self) -> int:
        """Blocks neither in use nor reserved."""
        return len(self._free) - self._reserved

    @property
    def in_use(self) -> int:
        return self.num_blocks - 1 - len(self._free)

    def reserve(self, n: int) -> bool:
        if n > self.free:
            return False
        self._reserved += n
        return True

    def take(self) -> int:
        """One reserved block."""
        if self._reserved < 1:
            raise RuntimeError("took a block that was not reserved")
        self._reserved -= 1
        return self._free.pop()

    def release(self, blocks: list[int], unreserve: int) -> None:
        self._free.extend(reversed(blocks))
        self._reserved -= unreserve
