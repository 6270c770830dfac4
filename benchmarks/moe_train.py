"""MoE vs dense GPT training speed on CPU, side by side, with the MoE layer's cost broken down.

    python benchmarks/moe_train.py [--steps 200] [--repeats 3] [--impl dense] [--smoke]

Both models are chapter 7's (configs/ch7_moe.py:cpu): the 4x128 character GPT, dense MLP of
width 512 vs 8 experts of width 256, top-2 (equal active parameters per token). Each is the
shared loop's compiled K-step training call (jaxcourse.train.step.jit_steps), timed after
compilation, the two interleaved `--repeats` times; the best time of each counts. The
breakdown times one feed-forward layer alone, forward + backward on the same [B, T, D]
activations: the dense MLP, the whole MoE layer, and its expert matmuls alone on full buffers,
so router + dispatch + combine = MoE - experts. Prints one markdown table and a JSON line.
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
from jaxcourse.models import layers, moe  # noqa: E402
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
    """Forward + backward ms of one feed-forward layer on the batch's activations."""
    o = moe_cfg.options_for("ffn", "moe")
    b, t, d = cfg.train.batch_size, moe_cfg.context, moe_cfg.d_model
    x = jax.random.normal(jax.random.key(0), (b, t, d))
    dense = layers.MLP(d, o.top_k * o.d_expert)
    layer = moe.MoE(d, o.d_expert, o)
    out = {}
    for name, module in (("dense_mlp", dense), ("moe_layer", layer)):
        params = module.init(jax.random.key(1), x)["params"]
        grad = jax.jit(jax.grad(lambda p, x, m=module: jnp.sum(m.apply({"params": p}, x) ** 2)))
        out[name] = 1e3 * _best(lambda g=grad, p=params: g(p, x), repeats)
    # The experts alone on their [G, E, C, D] buffers (what dispatch fills).
    from jaxcourse.models import moe_routing  # noqa: PLC0415
    cap = moe_routing.capacity(b * t // o.groups, o.n_experts, o.top_k, o.capacity_factor)
    buf = jax.random.normal(jax.random.key(2), (o.groups, o.n_experts, cap, d))
    experts = jax.tree.map(lambda a: a.value if hasattr(a, "value") else a,
                           layer.init(jax.random.key(1), x)["params"])
    experts = {k: v for k, v in experts.items() if k.startswith("w_")}

    def expert_loss(p, buf):
        y = jax.vmap(jax.vmap(lambda q, z: moe._expert_mlp(q, z, o.activation)),
                     in_axes=(None, 0))(p, buf)
        return jnp.sum(y ** 2)

    grad = jax.jit(jax.grad(expert_loss))
    out["moe_experts"] = 1e3 * _best(lambda: grad(experts, buf), repeats)
    out["moe_routing_dispatch_combine"] = out["moe_layer"] - out["moe_experts"]
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--impl", default="dense", help="model.moe.impl: dense or ragged")
    parser.add_argument("--smoke", action="store_true", help="tiny models, 4 steps (tests)")
    args = parser.parse_args(argv)
    cfg = moe_config("smoke" if args.smoke else "cpu")
    steps = 4 if args.smoke else args.steps
    cfg = config.derive(cfg, {"model.moe.impl": args.impl,
                              "model.moe.capacity_factor": 0.0 if args.impl != "dense"
                              else cfg.model.moe.capacity_factor})
    dense_cfg, moe_cfg = _models(cfg)
    calls = {name: _train_call(cfg, mc, steps) for name, mc in (("dense", dense_cfg),
                                                                 ("moe", moe_cfg))}
    for fn, state, batches in calls.values():  # compile both before timing either
        jax.block_until_ready(fn(state, batches))
    best = {name: float("inf") for name in calls}
    for _ in range(max(1, args.repeats)):  # interleaved, best of each
        for name, (fn, _, batches) in calls.items():
            state = jax.jit(lambda s: s)(calls[name][1])
            t0 = time.perf_counter()
            jax.block_until_ready(fn(state, batches))
            best[name] = min(best[name], time.perf_counter() - t0)
    tokens = steps * cfg.train.batch_size * dense_cfg.context
    result = {f"{n}_tokens_per_second": tokens / s for n, s in best.items()}
    result["moe_over_dense"] = result["moe_tokens_per_second"] / result["dense_tokens_per_second"]
    result.update({f"{k}_ms": v for k, v in _layer_costs(cfg, moe_cfg, args.repeats).items()})
    result.update(impl=args.impl, steps=steps, jax=jax.__version__,
                  device=jax.devices()[0].device_kind)
    print("| model | tokens/s | ms/step |\n|---|---|---|")
    for n, s in best.items():
        print(f"| {n} | {tokens / s:,.0f} | {1e3 * s / steps:.1f} |")
    print(f"\nMoE / dense tokens/s: {result['moe_over_dense']:.2f}x")
    print("feed-forward layer, forward + backward (ms): "
          + ", ".join(f"{k[:-3]} {v:.2f}" for k, v in result.items() if k.endswith("_ms")))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
