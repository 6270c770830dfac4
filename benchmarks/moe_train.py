"""MoE vs dense GPT training speed on CPU, side by side, with the MoE layer's cost broken down.

    python benchmarks/moe_train.py [--steps 200] [--repeats 3] [--impl blocked] [--smoke]

Both models are chapter 7's (configs/ch7_moe.py:cpu): the 4x128 character GPT, dense MLP of
width 512 vs 8 experts of width 256, top-2 (equal active parameters per token). Each is the
shared loop's compiled K-step training call (jaxcourse.train.step.jit_steps), timed after
compilation, the two interleaved `--repeats` times; the best time of each counts. The
breakdown (best of 10 x repeats) times one feed-forward layer alone, forward + backward on the same [B, T, D]
activations: the dense MLP, the whole MoE layer, its router alone and its expert matmuls alone
on the buffers dispatch fills, so dispatch + combine = MoE - router - experts. Prints one
markdown table and a JSON line.
"""
import argparse
import json
import os
import sys
import time

os.environ.setdefault("JAXCOURSE_CACHE", "off")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxcourse import config  # noqa: E402
from jaxcourse.lm import lm_task  # noqa: E402
from jaxcourse.lm.configs import moe_config  # noqa: E402
import flax.linen as nn  # noqa: E402

from jaxcourse.models import layers, moe, moe_routing  # noqa: E402
from jaxcourse.models.transformer import gpt_config  # noqa: E402
from jaxcourse.train import make_optimizer  # noqa: E402
from jaxcourse.train.step import init_state, jit_steps, stack_batches  # noqa: E402

VOCAB = 100


def _models(cfg):
    moe_cfg = gpt_config(cfg.model, vocab_size=VOCAB, ffn="moe")
    o = moe_cfg.options_for("ffn", "moe")
    dense_cfg = gpt_config(cfg.model, vocab_size=VOCAB, ffn="mlp", d_ff=o.top_k * o.d_expert)
    return dense_cfg, moe_cfg


def _train_call(cfg, model_cfg, steps: int):
    """(compiled K-step call, state, batches): the loop's own step, K = steps."""
    run = config.derive(cfg, {"train.steps_per_call": steps, "mesh": None})
    rng = np.random.default_rng(0)
    t = model_cfg.context
    data = [{"inputs": rng.integers(0, VOCAB, (cfg.train.batch_size, t)).astype(np.int32),
             "targets": rng.integers(0, VOCAB, (cfg.train.batch_size, t)).astype(np.int32)}
            for _ in range(steps)]
    task = lm_task(model_cfg, aux_weights=cfg.lm.aux_weights.to_dict())
    tx = make_optimizer(run.optimizer, run.train.steps)
    state = jax.jit(init_state(task, tx, run, data[0]))(jax.random.PRNGKey(0))
    return jit_steps(task, tx, run, None, None), state, stack_batches(data, 0, steps)


def _best(fn, repeats: int) -> float:
    jax.block_until_ready(fn())  # compile
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return min(times)


def _layer_costs(cfg, moe_cfg, repeats: int) -> dict:
    """Forward + backward ms of one feed-forward layer on the batch's activations, and of its
    parts: the router (logits, top-k, balancing and z losses), the experts alone on the
    buffers dispatch fills, and so dispatch + combine = layer - router - experts."""
    o = moe_cfg.options_for("ffn", "moe")
    b, t, d = cfg.train.batch_size, moe_cfg.context, moe_cfg.d_model
    x = jax.random.normal(jax.random.key(0), (b, t, d))
    dense = layers.MLP(d, o.top_k * o.d_expert)
    layer = moe.MoE(d, o.d_expert, o)
    out = {}

    def grad_ms(loss, params, *args):
        grad = jax.jit(jax.grad(loss))
        return 1e3 * _best(lambda: grad(params, *args), repeats)

    for name, module in (("dense_mlp", dense), ("moe_layer", layer)):
        params = nn.meta.unbox(module.init(jax.random.key(1), x)["params"])
        out[name] = grad_ms(lambda p, x, m=module: jnp.sum(m.apply({"params": p}, x) ** 2),
                            params, x)
    router_w = params["router"]["kernel"]
    experts = {k: v for k, v in params.items() if k.startswith("w_")}
    x_GxTxD = x.reshape(o.groups, -1, d)

    def router_loss(w, x):
        logits = x @ w
        weights, _ = moe_routing.top_k_route(logits, o.top_k, o.softmax)
        return (jnp.sum(weights ** 2) + moe_routing.load_balancing_loss(logits, o.top_k)
                + moe_routing.router_z_loss(logits))

    out["moe_router"] = grad_ms(router_loss, router_w, x_GxTxD)
    _, chosen = moe_routing.top_k_route(x_GxTxD @ router_w, o.top_k, o.softmax)
    if o.impl == "blocked":  # the experts on the expert-sorted blocks of these choices
        _, expert_N = moe.block_layout(chosen, o.n_experts, o.block)
        buf = jax.random.normal(jax.random.key(2), (expert_N.shape[0], o.block, d))
        fn = lambda p, z: moe.block_experts(p, z, expert_N, o.activation)  # noqa: E731
    else:  # the experts on their [G, E, C, D] buffers
        cap = moe_routing.capacity(b * t // o.groups, o.n_experts, o.top_k, o.capacity_factor)
        buf = jax.random.normal(jax.random.key(2), (o.groups, o.n_experts, cap, d))
        fn = jax.vmap(jax.vmap(lambda q, z: moe._expert_mlp(q, z, o.activation)),
                      in_axes=(None, 0))
    out["moe_experts"] = grad_ms(lambda p, z: jnp.sum(fn(p, z) ** 2), experts, buf)
    out["moe_dispatch_combine"] = out["moe_layer"] - out["moe_router"] - out["moe_experts"]
    out["expert_rows"] = float(np.prod(buf.shape[:-1]))  # rows each expert matmul computes
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--impl", default="", help="model.moe.impl (default: the config's, "
                        "blocked); not dense: dropless")
    parser.add_argument("--smoke", action="store_true", help="tiny models, 4 steps (tests)")
    args = parser.parse_args(argv)
    cfg = moe_config("smoke" if args.smoke else "cpu")
    steps = 4 if args.smoke else args.steps
    impl = args.impl or cfg.model.moe.impl
    cfg = config.derive(cfg, {"model.moe.impl": impl,
                              "model.moe.capacity_factor": 0.0 if impl != "dense"
                              else cfg.model.moe.capacity_factor})
    dense_cfg, moe_cfg = _models(cfg)
    calls = {name: _train_call(cfg, mc, steps) for name, mc in (("dense", dense_cfg),
                                                                 ("moe", moe_cfg))}
    # The call donates its state: each call gets a fresh copy (a jitted identity would
    # forward the very buffers).
    fresh = lambda s: jax.tree.map(jnp.copy, s)  # noqa: E731
    for fn, state, batches in calls.values():  # compile both before timing either
        jax.block_until_ready(fn(fresh(state), batches))
    best = {name: float("inf") for name in calls}
    for _ in range(max(1, args.repeats)):  # interleaved, best of each
        for name, (fn, state, batches) in calls.items():
            state = jax.block_until_ready(fresh(state))
            t0 = time.perf_counter()
            jax.block_until_ready(fn(state, batches))
            best[name] = min(best[name], time.perf_counter() - t0)
    tokens = steps * cfg.train.batch_size * dense_cfg.context
    result = {f"{n}_tokens_per_second": tokens / s for n, s in best.items()}
    result["moe_over_dense"] = result["moe_tokens_per_second"] / result["dense_tokens_per_second"]
    costs = _layer_costs(cfg, moe_cfg, 10 * args.repeats)  # tens of ms each: many tries
    result["expert_rows"] = costs.pop("expert_rows")
    result.update({f"{k}_ms": v for k, v in costs.items()})
    result.update(impl=impl, steps=steps, jax=jax.__version__,
                  device=jax.devices()[0].device_kind)
    print("| model | tokens/s | ms/step |\n|---|---|---|")
    for n, s in best.items():
        print(f"| {n} | {tokens / s:,.0f} | {1e3 * s / steps:.1f} |")
    print(f"\nMoE / dense tokens/s: {result['moe_over_dense']:.2f}x")
    print("feed-forward layer, forward + backward (ms): "
          + ", ".join(f"{k[:-3]} {v:.2f}" for k, v in result.items() if k.endswith("_ms"))
          + f"; the expert matmuls compute {result['expert_rows']:.0f} rows")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
