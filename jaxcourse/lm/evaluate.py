"""Compiled forward passes and mean next-token losses of a GPT on fixed batches."""
from __future__ import annotations

import functools

import jax
import numpy as np

from jaxcourse.lm.task import lm_loss
from jaxcourse.models.transformer import GPT, GPTConfig


@functools.partial(jax.jit, static_argnums=0)
def logits_fn(model_cfg: GPTConfig, params, inputs_BxT):
    """Compiled once per (model config, input shape); params are an argument, not constants."""
    return GPT(model_cfg).apply({"params": params}, inputs_BxT)


@functools.partial(jax.jit, static_argnums=0)
def batch_loss(model_cfg: GPTConfig, params, batch):
    return lm_loss(logits_fn(model_cfg, params, batch["inputs"]), batch["targets"])[0]


def mean_loss(model_cfg: GPTConfig, params, batches) -> float:
    """Mean over batches of the batch-mean next-token loss (nats)."""
    return float(np.mean([batch_loss(model_cfg, params, b) for b in batches]))
