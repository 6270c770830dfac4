"""A GPT's parameter tree from shapes alone, its logical axis names, and parameter counts."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxcourse.models.transformer import GPT, GPTConfig


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
