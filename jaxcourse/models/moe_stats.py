"""What the routers did: per-layer expert assignments of a GPT with MoE layers and their
summaries (load per expert, traffic per domain, mutual information, tokens per expert).

The MoE layer sows its top-k choices as "intermediates"; `expert_assignments` reads them back
in layer order, whether the stack is a Python loop or an nn.scan.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax.sharding import NamedSharding, PartitionSpec

from jaxcourse.models import aux_losses
from jaxcourse.models.moe_routing import capacity
from jaxcourse.lm.task import lm_loss
from jaxcourse.models.transformer import GPT
from jaxcourse.parallel.mesh import make_mesh
from jaxcourse.parallel.rules import GPT_RULES, use_mesh


@functools.partial(jax.jit, static_argnums=0)
def _intermediates(model_cfg, params, model_state, tokens_BxT):
    _, state = GPT(model_cfg).apply({"params": params, **model_state}, tokens_BxT,
                                    mutable=["intermediates"])
    return state["intermediates"]


def expert_assignments(model_cfg, params, tokens_BxT, model_state=None) -> np.ndarray:
    """Chosen experts [L_moe, B*T, k] of every MoE layer for every token, in layer order.
    `model_state`: the task's non-parameter variables (the aux-loss-free router bias)."""
    flat = traverse_util.flatten_dict(_intermediates(model_cfg, params, model_state or {},
                                                     tokens_BxT))
    found = [(path, v[0]) for path, v in flat.items() if path[-1] == "experts"]
    if not found:
        raise ValueError("the model has no MoE layer (model.ffn != 'moe')")
    layers = []
    for path, value in sorted(found, key=lambda pv: _layer_index(pv[0])):
        value = np.asarray(value)
        if "layers" in path:  # scanned: a leading axis of repeats
            layers.extend(v.reshape(-1, v.shape[-1]) for v in value)
        else:
            layers.append(value.reshape(-1, value.shape[-1]))
    return np.stack(layers)


def _layer_index(path) -> int:
    for part in path:
        if part.startswith("layer_"):
            return int(part.split("_")[1])
    return 0


def load_fractions(assign_LxNxK: np.ndarray, n_experts: int) -> np.ndarray:
    """[L, E]: the share of each layer's assignments that went to each expert."""
    counts = np.stack([np.bincount(a.ravel(), minlength=n_experts) for a in assign_LxNxK])
    return counts / counts.sum(axis=1, keepdims=True)


def domain_traffic(assign_LxNxK, domain_N, n_domains: int, n_experts: int) -> np.ndarray:
    """[L, n_domains, E]: per layer and domain, the share of its tokens' assignments per expert."""
    out = np.zeros((assign_LxNxK.shape[0], n_domains, n_experts))
    for d in range(n_domains):
        out[:, d] = load_fractions(assign_LxNxK[:, domain_N == d], n_experts)
    return out


def mutual_information(assign_LxNxK, domain_N, n_experts: int) -> np.ndarray:
    """[L]: I(domain; expert) in bits over the assignments: 0 when experts ignore the domain,
    up to the domain entropy when each expert serves one domain."""
    n_domains = int(domain_N.max()) + 1
    out = []
    for a in assign_LxNxK:
        joint = np.zeros((n_domains, n_experts))
        np.add.at(joint, (np.repeat(domain_N, a.shape[1]), a.ravel()), 1.0)
        joint /= joint.sum()
        indep = joint.sum(1, keepdims=True) * joint.sum(0, keepdims=True)
        nz = joint > 0
        out.append(float(np.sum(joint[nz] * np.log2(joint[nz] / indep[nz]))))
    return np.asarray(out)


def top_tokens(assign_NxK, tokens_N, n_experts: int, n: int = 8, min_count: int = 20):
    """Per expert, the n tokens it takes most often relative to their frequency:
    [(token id, share of that token's assignments going to the expert), ...]."""
    ids = np.unique(tokens_N)
    counts = np.zeros((len(ids), n_experts))
    index = np.searchsorted(ids, tokens_N)
    np.add.at(counts, (np.repeat(index, assign_NxK.shape[1]), assign_NxK.ravel()), 1.0)
    total = counts.sum(1)
    share = counts / np.maximum(total[:, None], 1)
    share[total < min_count] = 0  # rare tokens say nothing
    return [[(int(ids[i]), float(share[i, e])) for i in np.argsort(-share[:, e])[:n]]
            for e in range(n_experts)]


def active_params(model_cfg, params) -> int:
    """Parameters one token uses: all of them, less the experts its router does not pick."""
    total = 0
    for path, leaf in traverse_util.flatten_dict(params).items():
        if "moe" in path and path[-1] in ("w_in", "w_gate", "w_out"):
            o = model_cfg.options_for("ffn", "moe")
            total += leaf.size * o.top_k // o.n_experts
        else:
            total += leaf.size
    return int(total)


def expert_parallel_check(model_cfg, params, batch) -> dict:
    """One batch's loss and gradients with the experts split over an `expert` mesh axis vs
    one device: the largest absolute difference, and the all_to_all bytes one device moves
    per training step (dispatch + combine, forward and backward). Expert parallelism is
    the dense dispatch's: a model on a dropless sorted path (impl=blocked, ...) is checked
    with the same parameters on impl=dense, the same function."""
    o = model_cfg.options_for("ffn", "moe")
    if o.impl != "dense":
        o = dataclasses.replace(o, impl="dense")
        model_cfg = dataclasses.replace(model_cfg, options=tuple(
            (k, o if k == "moe" else v) for k, v in model_cfg.options))
    n = 1
    while (n * 2 <= jax.device_count() and o.n_experts % (n * 2) == 0
           and o.groups % (n * 2) == 0):
        n *= 2
    inputs, targets = jnp.asarray(batch["inputs"]), jnp.asarray(batch["targets"])

    def loss(p):
        logits, state = GPT(model_cfg).apply({"params": p}, inputs,
                                             mutable=aux_losses.COLLECTIONS)
        return lm_loss(logits, targets)[0] + sum(aux_losses.collect(state)[0].values())

    out = {"expert_parallel_devices": n, "expert_parallel_max_diff": float("nan"),
           "all_to_all_bytes_per_step": 0.0}
    if n == 1:  # one device (e.g. one GPU): nothing to compare
        return out
    ref = jax.jit(jax.value_and_grad(loss))(params)
    mesh = make_mesh({"expert": n, "data": jax.device_count() // n})
    with use_mesh(mesh, GPT_RULES):
        replicated = jax.device_put(params, NamedSharding(mesh, PartitionSpec()))
        got = jax.jit(jax.value_and_grad(loss))(replicated)
    diffs = [float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
             for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref))]
    tokens = inputs.size
    cap = capacity(tokens // o.groups, o.n_experts, o.top_k, o.capacity_factor)
    local_buffer = (o.groups // n) * o.n_experts * cap * model_cfg.d_model * 4
    n_moe = model_cfg.n_layer if model_cfg.ffn == "moe" else 0
    out.update(expert_parallel_max_diff=max(diffs),
               all_to_all_bytes_per_step=4.0 * n_moe * local_buffer * (n - 1) / n)
    return out
