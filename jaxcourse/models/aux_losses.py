"""The auxiliary-loss channel: named losses and metrics that any sublayer can emit.

A sublayer calls `sow_loss(self, "load_balance", value)` (or `sow_metric`); the values ride
in flax collections, so they pass through `nn.scan` (stacked per layer) and `nn.remat`
unchanged. The task applies the model with `mutable=COLLECTIONS` and reads them back with
`collect`: losses are summed over layers (each MoE layer adds its own balancing term, as in
Switch / GShard), metrics averaged over layers. The LM task adds `weight * loss` for every
weight given in config (`lm.aux_loss_weights`) and logs every value.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

LOSSES = "aux_loss"
METRICS = "aux_metric"
COLLECTIONS = (LOSSES, METRICS)


def _add(total, value):
    return total + value


def sow_loss(module: nn.Module, name: str, value) -> None:
    """Emits a scalar auxiliary loss (repeated calls in one scope add up)."""
    module.sow(LOSSES, name, jnp.asarray(value, jnp.float32), init_fn=lambda: 0.0,
               reduce_fn=_add)


def sow_metric(module: nn.Module, name: str, value) -> None:
    """Emits a scalar metric (logged, never differentiated into the loss)."""
    module.sow(METRICS, name, jax.lax.stop_gradient(jnp.asarray(value, jnp.float32)),
               init_fn=lambda: 0.0, reduce_fn=_add)


def _by_name(collection, reduce) -> dict:
    groups: dict[str, list] = {}
    for path, value in traverse_util.flatten_dict(collection or {}).items():
        groups.setdefault(path[-1], []).append(jnp.ravel(value))
    return {name: reduce(jnp.concatenate(vals)) for name, vals in groups.items()}


def collect(variables) -> tuple[dict, dict]:
    """({loss name: sum over layers}, {metric name: mean over layers}) from the mutable
    variables that `model.apply(..., mutable=COLLECTIONS)` returned."""
    variables = nn.meta.unbox(variables)
    return (_by_name(variables.get(LOSSES), jnp.sum),
            _by_name(variables.get(METRICS), jnp.mean))
