"""The one language-model task of the shared loop: next-token cross-entropy of a GPT.

`init` hands the loop *boxed* parameters: their logical axis names (nn.with_logical_partitioning)
are what the loop's sharding rules read, so the same task trains unsharded, data parallel,
FSDP, tensor parallel or (with `mesh` and `microbatches`) as a GPipe pipeline.
"""
from __future__ import annotations

import contextlib
from collections.abc import Mapping

import jax.numpy as jnp
import optax

from jaxcourse.errors import UserError
from jaxcourse.models import aux_losses
from jaxcourse.models.block import Stack
from jaxcourse.models.transformer import GPT, GPTConfig
from jaxcourse.parallel.pipeline import pipelined
from jaxcourse.train import Task


def lm_loss(logits_BxTxV, targets_BxT, mask_BxT=None):
    """Mean next-token cross-entropy (nats) and accuracy over the unmasked positions."""
    nll_BxT = optax.softmax_cross_entropy_with_integer_labels(logits_BxTxV, targets_BxT)
    correct_BxT = (jnp.argmax(logits_BxTxV, -1) == targets_BxT).astype(jnp.float32)
    if mask_BxT is None:
        mask_BxT = jnp.ones_like(nll_BxT)
    mask_BxT = mask_BxT.astype(jnp.float32)
    denom = jnp.maximum(mask_BxT.sum(), 1.0)
    loss = (nll_BxT * mask_BxT).sum() / denom
    return loss, {"loss": loss, "accuracy": (correct_BxT * mask_BxT).sum() / denom}


def lm_task(model_cfg: GPTConfig, mesh=None, microbatches: int = 1,
            aux_weights: Mapping[str, float] | None = None, module=None) -> Task:
    """Next-token prediction; batches hold "inputs" and "targets" [B, T] and optionally a
    "mask" [B, T] of the positions that count. With a mesh whose `pipeline` axis is > 1 the
    scanned block stack runs as a GPipe pipeline of `microbatches` microbatches (embedding
    and head stay GSPMD-sharded); without one the mesh comes from the loop's config.

    Auxiliary losses the sublayers emit (models/aux_losses.py, e.g. an MoE layer's
    "load_balance" and "z_loss") are added as `weight * value` for every name in
    `aux_weights` (missing names weigh 0); every auxiliary loss and metric is logged as
    `aux/<name>`. Only training adds them: the evaluation loss is the LM loss alone, so
    models with and without auxiliary losses compare. Non-parameter variables (e.g. the MoE
    router's balancing bias) are the task's model state, updated by training steps only.
    `module` replaces GPT(model_cfg) by a module with its parameters (e.g. the GPT under
    qwix's quantized training, quant/qwix_ref.py)."""
    model = GPT(model_cfg) if module is None else module
    weights = dict(aux_weights or {})
    piped = mesh is not None and mesh.shape["pipeline"] > 1
    if piped and not model_cfg.scan_layers:
        raise UserError("a pipeline mesh needs model.scan_layers=True: pipeline stages are "
                        "slices of the scanned layer stack")

    def init(rng, batch):
        variables = model.init(rng, jnp.asarray(batch["inputs"][:1]))
        state = {k: v for k, v in variables.items() if k not in _NOT_STATE}
        return variables["params"], state

    def loss(params, model_state, batch, rng, train):
        mutable = [*aux_losses.COLLECTIONS, *model_state]
        with pipelined(Stack, mesh, microbatches) if piped else contextlib.nullcontext():
            logits, new_vars = model.apply({"params": params, **model_state}, batch["inputs"],
                                           train=train, rngs={"dropout": rng}, mutable=mutable)
        value, metrics = lm_loss(logits, batch["targets"], batch.get("mask"))
        aux, aux_metrics = aux_losses.collect(new_vars)
        for name, v in {**aux, **aux_metrics}.items():
            metrics[f"aux/{name}"] = v
        for name, w in weights.items():  # the training objective; eval reports the LM loss
            if train and w and name in aux:
                value = value + w * aux[name]
        new_state = {k: new_vars[k] for k in model_state} if train else model_state
        return value, (metrics, new_state)

    return Task(init=init, loss=loss)


_NOT_STATE = ("params", "intermediates", *aux_losses.COLLECTIONS)
