"""Both engines on the chapter's 2-layer MLP, checked against jax.grad.

The MLP and its loss are `mlp_backprop.loss` (tanh hidden layer, softmax
cross-entropy); here the same function is rebuilt from engine primitives and
every parameter gradient is compared with `jax.grad(mlp_backprop.loss)`.
"""

from __future__ import annotations

import jax
import numpy as np

from jaxcourse.autodiff import engine, mlp_backprop, tensor
from jaxcourse.autodiff.engine import Value
from jaxcourse.autodiff.tensor import Tensor

NAMES = ("w1", "b1", "w2", "b2")


def _jax_grads(params, x_BxD, y_B) -> dict:
    grads = jax.jit(jax.grad(mlp_backprop.loss))(params, x_BxD, y_B)
    return {k: np.asarray(v) for k, v in grads.items()}


def _max_diff(got: dict, want: dict) -> float:
    return max(float(np.max(np.abs(np.asarray(got[k]) - want[k]))) for k in NAMES)


def scalar_mlp_loss(values: dict, x_BxD: np.ndarray, y_B: np.ndarray) -> Value:
    """The MLP loss from scalar Values: every multiply is its own graph node."""
    total = Value(0.0)
    for x_row, label in zip(x_BxD, y_B):
        h = [v.tanh() for v in engine.linear([Value(float(a)) for a in x_row], values["w1"], values["b1"])]
        logits = engine.linear(h, values["w2"], values["b2"])
        m = max(l.data for l in logits)  # constant shift: log-sum-exp without overflow
        lse = sum(((l - m).exp() for l in logits), Value(0.0)).log() + m
        total = total + (lse - logits[int(label)])
    return total / len(y_B)


def scalar_engine_vs_jax(params: dict, x_BxD: np.ndarray, y_B: np.ndarray) -> dict:
    """Scalar engine gradient of the MLP loss vs jax.grad (float32)."""
    values = {k: engine.to_values(np.asarray(params[k])) for k in NAMES}
    loss = scalar_mlp_loss(values, x_BxD, y_B)
    loss.backward()
    got = {k: np.asarray(engine.grads_of(values[k])) for k in NAMES}
    return {"max_abs_diff": _max_diff(got, _jax_grads(params, x_BxD, y_B)),
            "graph_nodes": len(engine.topological_order(loss)), "loss": loss.data}


def tensor_mlp_loss(ts: dict, x_BxD: np.ndarray, y_B: np.ndarray) -> Tensor:
    h_BxH = (Tensor(x_BxD) @ ts["w1"] + ts["b1"]).tanh()
    return tensor.cross_entropy(h_BxH @ ts["w2"] + ts["b2"], y_B)


def tensor_engine_vs_jax(params: dict, x_BxD: np.ndarray, y_B: np.ndarray) -> dict:
    """Vectorized engine gradient of the same loss vs jax.grad, both float32."""
    ts = {k: Tensor(np.asarray(params[k], np.float32)) for k in NAMES}
    loss = tensor_mlp_loss(ts, np.asarray(x_BxD, np.float32), np.asarray(y_B))
    loss.backward()
    got = {k: ts[k].grad for k in NAMES}
    return {"max_abs_diff": _max_diff(got, _jax_grads(params, x_BxD, y_B)),
            "graph_nodes": len(engine.topological_order(loss)), "loss": float(loss.data)}
