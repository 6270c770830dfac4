"""A GPT's parameter tree from shapes alone, its logical axis names, parameter counts and
decode-state bytes per token."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxcourse.models.transformer import GPT, GPTConfig, init_cache


def abstract_params(model_cfg: GPTConfig):
    """ShapeDtypeStructs of the (unboxed) parameters; nothing is allocated."""
    return jax.eval_shape(lambda: nn.meta.unbox(GPT(model_cfg).init(
        jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]))


def with_axis_names(model_cfg: GPTConfig, params):
    """`params` (plain arrays of a GPT) boxed with the model's logical axis names, as
    `GPT.init` boxes them: for a Task whose init hands over trained parameters (chapter 6's
    RL phases), so that the loop shards them on a mesh instead of replicating them."""
    boxed = jax.eval_shape(lambda: GPT(model_cfg).init(
        jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"])
    return nn.meta.replace_boxed(boxed, params)


def count_params(tree) -> int:
    """Number of scalars in a tree of arrays or ShapeDtypeStructs (boxed or not)."""
    return int(sum(np.prod(np.shape(x), dtype=np.int64) for x in jax.tree.leaves(tree)))


def cache_bytes_per_token(cfg, dtype=jnp.float32) -> int:
    """Decode-state bytes one more token adds, all layers (any mixers): measured from the
    shapes of `init_cache` at two lengths, so fixed-size recurrent states count 0."""
    def size(length):
        tree = jax.eval_shape(lambda: init_cache(cfg, 1, length, dtype)["layers"])
        return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))

    return size(2) - size(1)
