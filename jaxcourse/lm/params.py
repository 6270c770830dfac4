"""A GPT's parameter tree from shapes alone, and parameter counts of any tree."""
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


def count_params(tree) -> int:
    """Number of scalars in a tree of arrays or ShapeDtypeStructs (boxed or not)."""
    return int(sum(np.prod(np.shape(x), dtype=np.int64) for x in jax.tree.leaves(tree)))
