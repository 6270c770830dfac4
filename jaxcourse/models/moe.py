"""Mixture of experts as the block's feed-forward: `model.ffn="moe"` (options `model.moe.*`).

    y = sum_k  gate_k(x) * expert_{e_k(x)}(x)   (+ shared experts, DeepSeek-V3 style)

Routing, balancing losses and capacity are the pure functions of moe_routing.py. Two
implementations compute the same function behind `impl`:
    "dense"   GShard's one-hot dispatch / combine einsums into [E, C, D] buffers of fixed
              capacity (tokens past capacity are dropped and pass through the residual);
              the form expert parallelism needs (fixed-size all_to_all buffers).
    "ragged"  dropless: assignments sorted by expert, both expert matmuls as one grouped
              matmul each (`lax.ragged_dot`), unsorted and weighted.
    "pallas"  the same dropless path with both grouped matmuls through the Mosaic GPU kernel
              `pallas_kernels.grouped_matmul` on a GPU; elsewhere its ragged_dot reference.
    "blocked" dropless, MegaBlocks-style: each expert's assignments fill whole blocks of
              `block` rows (its last block zero-padded), and both matmuls are one batched
              matmul over the blocks, each block with its expert's weights. At most
              T*k + E*(block-1) rows of work, where a CPU's ragged_dot does every expert
              for every row; the fast dropless path on CPU.
With an `expert` mesh axis > 1 the dense path runs the experts with `all_to_all` dispatch
(parallel/expert.py): each device holds E/n experts and its own token groups.

Auxiliary losses (the block's aux channel): "load_balance" (E sum f_i P_i) and "z_loss";
metrics "dropped_fraction" and "load_cv". The task weighs the losses by config.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxcourse.errors import UserError
from jaxcourse.models import aux_losses, moe_routing as routing
from jaxcourse.models.layers import MLP, partitioned
from jaxcourse.parallel.expert import AXIS, expert_parallel

ROUTERS = ("topk", "expert_choice")
IMPLS = ("dense", "ragged", "pallas", "blocked")
STATE = "router_state"  # aux-loss-free balancing bias: model state, not a parameter


@dataclasses.dataclass(frozen=True)
class MoEOptions:
    n_experts: int = 8
    top_k: int = 2
    d_expert: int = 0              # Expert hidden width; 0: the model's d_ff.
    n_shared: int = 0              # Always-on shared experts (DeepSeek-V3); width n * d_expert.
    router: str = "topk"           # topk | expert_choice
    softmax: str = "before"        # before | after the top-k selection (topk router)
    capacity_factor: float = 1.25  # Slots per expert = factor * T * k / E; <= 0: dropless.
    impl: str = "dense"            # dense | ragged | pallas | blocked (the last 3 dropless)
    block: int = 64                # Rows per block of impl=blocked.
    groups: int = 1                # Token groups (capacity is per group; expert parallelism
                                   # needs a multiple of the expert axis).
    jitter: float = 0.0            # Multiplicative router-input noise while training (Switch).
    bias_rate: float = 0.0         # > 0: DeepSeek-V3 aux-loss-free balancing, per-step rate.
    activation: str = "gelu"       # gelu | swiglu experts

    def __post_init__(self):
        def bad(key, why):
            raise UserError(f"model.moe.{key}={getattr(self, key)!r} {why}")
        if self.n_experts < 1:
            bad("n_experts", "must be >= 1")
        if not 1 <= self.top_k <= self.n_experts:
            bad("top_k", f"must be in 1..n_experts={self.n_experts}")
        for key, choices in (("router", ROUTERS), ("softmax", ("before", "after")),
                             ("impl", IMPLS), ("activation", ("gelu", "swiglu"))):
            if getattr(self, key) not in choices:
                bad(key, f"is not one of {', '.join(choices)}")
        if self.impl != "dense" and (self.capacity_factor > 0 or self.router != "topk"):
            bad("impl", "is dropless top-k routing: set capacity_factor<=0 and router=topk")
        if self.block < 1:
            bad("block", "must be >= 1")
        if self.groups < 1 or self.d_expert < 0 or self.n_shared < 0:
            bad("groups", "must be >= 1 (and d_expert, n_shared >= 0)")
        if self.jitter < 0 or self.bias_rate < 0:
            bad("jitter", "and bias_rate must be >= 0")


def _expert_mlp(params, x_CxD, activation: str):
    """One expert's MLP on its buffer (vmapped over experts, or run per device)."""
    h = x_CxD @ params["w_in"]
    if activation == "swiglu":
        h = nn.silu(x_CxD @ params["w_gate"]) * h
    else:
        h = nn.gelu(h)
    return h @ params["w_out"]


class MoE(nn.Module):
    d_model: int
    d_expert: int
    options: MoEOptions
    dtype: jnp.dtype = jnp.float32
    deterministic: bool = True

    Options = MoEOptions
    slot_name = "moe"

    @classmethod
    def from_config(cls, cfg, options, *, name, deterministic=True):
        return cls(cfg.d_model, options.d_expert or cfg.ff_dim, options,
                   dtype=cfg.compute_dtype, deterministic=deterministic, name=name)

    def _experts(self):
        o, d, f = self.options, self.d_model, self.d_expert
        init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal",
                                                in_axis=-2, out_axis=-1, batch_axis=(0,))
        shapes = {"w_in": ((o.n_experts, d, f), ("expert", "embed", "mlp")),
                  "w_out": ((o.n_experts, f, d), ("expert", "mlp", "embed"))}
        if o.activation == "swiglu":
            shapes["w_gate"] = shapes["w_in"]
        return {k: self.param(k, partitioned(init, names), shape).astype(self.dtype)
                for k, (shape, names) in shapes.items()}

    @nn.compact
    def __call__(self, x_BxTxD):
        o = self.options
        b, t, d = x_BxTxD.shape
        if (b * t) % o.groups:
            raise UserError(f"model.moe.groups={o.groups} does not divide the {b * t} tokens "
                            "of the batch")
        x_GxTxD = x_BxTxD.reshape(o.groups, b * t // o.groups, d)
        router_in = x_GxTxD
        if o.jitter > 0 and not self.deterministic:
            noise = jax.random.uniform(self.make_rng("dropout"), x_GxTxD.shape,
                                       minval=1.0 - o.jitter, maxval=1.0 + o.jitter)
            router_in = x_GxTxD * noise
        logits_GxTxE = nn.Dense(o.n_experts, use_bias=False, dtype=jnp.float32, name="router",
                                kernel_init=partitioned(nn.initializers.xavier_uniform(),
                                                        ("embed", None)))(router_in)
        aux_losses.sow_loss(self, "z_loss", routing.router_z_loss(logits_GxTxE))
        experts = self._experts()
        if o.router == "expert_choice":
            cap = routing.capacity(x_GxTxD.shape[1], o.n_experts, o.top_k, o.capacity_factor)
            dispatch, combine = routing.expert_choice(logits_GxTxE, cap)
            y_GxTxD = self._dense(x_GxTxD, dispatch, combine, experts)
            taken = dispatch.any(axis=(2, 3))
            aux_losses.sow_metric(self, "dropped_fraction", 1.0 - taken.mean())
        else:
            y_GxTxD = self._token_choice(x_GxTxD, logits_GxTxE, experts)
        y_BxTxD = y_GxTxD.reshape(b, t, d).astype(x_BxTxD.dtype)
        if o.n_shared:
            shared = MLP(d, o.n_shared * self.d_expert, o.activation, dtype=self.dtype,
                         name="shared")
            y_BxTxD = y_BxTxD + shared(x_BxTxD)
        return y_BxTxD

    def _token_choice(self, x_GxTxD, logits_GxTxE, experts):
        o = self.options
        bias = None
        if o.bias_rate > 0:
            bias = self.variable(STATE, "bias", jnp.zeros, (o.n_experts,), jnp.float32)
        weights, chosen = routing.top_k_route(logits_GxTxE, o.top_k, o.softmax,
                                              None if bias is None else bias.value)
        load_E = routing.expert_load(chosen, o.n_experts)
        if bias is not None and not self.deterministic and not self.is_initializing() \
                and self.is_mutable_collection(STATE):
            # DeepSeek-V3: raise the bias of under-loaded experts, lower the over-loaded.
            bias.value = bias.value + o.bias_rate * jnp.sign(load_E.mean() - load_E)
        aux_losses.sow_loss(self, "load_balance",
                            routing.load_balancing_loss(logits_GxTxE, o.top_k))
        aux_losses.sow_metric(self, "load_cv", routing.coefficient_of_variation(load_E))
        self.sow("intermediates", "expert_load", load_E)
        self.sow("intermediates", "experts", chosen)
        if o.impl != "dense":
            aux_losses.sow_metric(self, "dropped_fraction", 0.0)
            dropless = _blocked if o.impl == "blocked" else _ragged
            return dropless(x_GxTxD, weights, chosen, experts, o)
        cap = routing.capacity(x_GxTxD.shape[1], o.n_experts, o.top_k, o.capacity_factor)
        dispatch, combine, kept = routing.dispatch_combine(weights, chosen, o.n_experts, cap)
        aux_losses.sow_metric(self, "dropped_fraction", 1.0 - kept.mean())
        return self._dense(x_GxTxD, dispatch, combine, experts)

    def _dense(self, x_GxTxD, dispatch_GxTxExC, combine_GxTxExC, experts):
        o = self.options
        x_GxExCxD = jnp.einsum("gtec,gtd->gecd", dispatch_GxTxExC.astype(x_GxTxD.dtype),
                               x_GxTxD)
        mesh = jax.sharding.get_abstract_mesh()
        n = 1 if mesh.empty else dict(mesh.shape).get(AXIS, 1)
        fn = lambda p, x: _expert_mlp(p, x, o.activation)  # noqa: E731
        if n > 1:
            if o.n_experts % n or o.groups % n:
                raise UserError(f"model.moe.n_experts={o.n_experts} and model.moe.groups="
                                f"{o.groups} must both be divisible by the expert mesh axis "
                                f"({n} devices)")
            y_GxExCxD = expert_parallel(fn, experts, x_GxExCxD, mesh)
        else:
            y_GxExCxD = jax.vmap(jax.vmap(fn), in_axes=(None, 0))(experts, x_GxExCxD)
        return jnp.einsum("gtec,gecd->gtd", combine_GxTxExC.astype(y_GxExCxD.dtype), y_GxExCxD)


def _grouped_matmul(impl: str):
    """(lhs [M, K], rhs [E, K, N], sizes [E]) -> [M, N] for the dropless path."""
    if impl == "ragged":
        return jax.lax.ragged_dot
    # Lazy: only this switch needs the kernels package. Off a GPU the kernel would run in the
    # (slow) interpreter, so the layer takes its reference; the kernel tests use interpret mode.
    from pallas_kernels.grouped_matmul import (  # noqa: PLC0415
        grouped_matmul, grouped_matmul_reference)
    if jax.default_backend() == "gpu":
        return lambda lhs, rhs, sizes: grouped_matmul(lhs, rhs, sizes, interpret=False)
    return grouped_matmul_reference


def block_layout(experts_GxTxK, n_experts: int, block: int):
    """Where impl=blocked puts each of the A = T*k assignments: (dest_A, the row in the
    [N*block] buffer; expert_N, the expert of each of the N blocks). Assignment a takes row
    rank_a of its expert's blocks (no sort: a one-hot cumsum ranks it); N is the static bound
    ceil(A / block) + E on sum_e ceil(size_e / block), and the blocks past the last expert's
    (all zeros) take the last expert, whose weights give them zero output."""
    expert_A = experts_GxTxK.reshape(-1)
    onehot_AxE = jax.nn.one_hot(expert_A, n_experts, dtype=jnp.int32)
    rank_A = jnp.take_along_axis(jnp.cumsum(onehot_AxE, axis=0), expert_A[:, None], 1)[:, 0] - 1
    blocks_E = (onehot_AxE.sum(axis=0) + block - 1) // block
    end_E = jnp.cumsum(blocks_E)
    dest_A = (end_E - blocks_E)[expert_A] * block + rank_A
    n_blocks = -(-expert_A.shape[0] // block) + n_experts
    expert_N = jnp.minimum(jnp.searchsorted(end_E, jnp.arange(n_blocks), side="right"),
                           n_experts - 1)
    return dest_A, expert_N


def block_experts(params, x_NxBxD, expert_N, activation: str):
    """The expert MLPs on the blocks, each block one batched matmul with its expert's weights."""
    def matmul(z_NxBxK, w_ExKxF):
        return jnp.einsum("nbk,nkf->nbf", z_NxBxK, w_ExKxF[expert_N])

    h = matmul(x_NxBxD, params["w_in"])
    if activation == "swiglu":
        h = nn.silu(matmul(x_NxBxD, params["w_gate"])) * h
    else:
        h = nn.gelu(h)
    return matmul(h, params["w_out"])


def _blocked(x_GxTxD, weights_GxTxK, experts_GxTxK, params, o: MoEOptions):
    """Dropless on expert-sorted blocks: scatter into the blocks, the experts, gather back."""
    d = x_GxTxD.shape[-1]
    k, b = o.top_k, o.block
    x_TxD = x_GxTxD.reshape(-1, d)
    dest_A, expert_N = block_layout(experts_GxTxK, o.n_experts, b)
    x_NxBxD = (jnp.zeros((expert_N.shape[0] * b, d), x_TxD.dtype)
               .at[dest_A].set(jnp.repeat(x_TxD, k, axis=0), unique_indices=True)
               .reshape(-1, b, d))
    out_AxD = block_experts(params, x_NxBxD, expert_N, o.activation).reshape(-1, d)[dest_A]
    y_TxD = jnp.einsum("tk,tkd->td", weights_GxTxK.reshape(-1, k).astype(out_AxD.dtype),
                       out_AxD.reshape(-1, k, d))
    return y_TxD.reshape(x_GxTxD.shape)


def _ragged(x_GxTxD, weights_GxTxK, experts_GxTxK, params, o: MoEOptions):
    """Dropless: sort the T*k assignments by expert, two grouped matmuls, unsort."""
    d = x_GxTxD.shape[-1]
    x_TxD = x_GxTxD.reshape(-1, d)
    k = o.top_k
    flat = experts_GxTxK.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    x_sorted = x_TxD[order // k]
    sizes_E = jnp.bincount(flat, length=o.n_experts).astype(jnp.int32)
    grouped = _grouped_matmul(o.impl)
    h = grouped(x_sorted, params["w_in"], sizes_E)
    if o.activation == "swiglu":
        h = nn.silu(grouped(x_sorted, params["w_gate"], sizes_E)) * h
    else:
        h = nn.gelu(h)
    out_sorted = grouped(h, params["w_out"], sizes_E)
    out_TKxD = jnp.zeros_like(out_sorted).at[order].set(out_sorted)
    out_TxKxD = out_TKxD.reshape(-1, k, d)
    y_TxD = jnp.einsum("tk,tkd->td", weights_GxTxK.reshape(-1, k).astype(out_TxKxD.dtype),
                       out_TxKxD)
    return y_TxD.reshape(x_GxTxD.shape)
