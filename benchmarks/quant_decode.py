"""Quantized decode on CPU: weight-only int8 / int4 and W8A8 vs float32 at a size where the
one-row decode step is bound by reading the weights.

    python benchmarks/quant_decode.py [--size 8x512] [--schemes float32,int8,w8a8,int4-g128]
                                      [--new-tokens 96] [--repeats 5] [--passes 2]

A random GPT (context 128, 4 heads; speed does not depend on the weights) quantized with
`quant.weights.quantize_params` and decoded greedily by `models/decode.generate` through
`quant.model.QuantizedGPT`, batch 1, a prompt of 8 tokens: best of `--repeats` per pass, the
schemes in turn, `--passes` times (best pass reported). Chapter 4's compression lab
(configs/ch4_compress.py) measures the same schemes on its trained 4x128 GPT, with quality.
"""
import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="8x512", help="layers x width")
    p.add_argument("--schemes", default="float32,int8,w8a8,int4-g128")
    p.add_argument("--new-tokens", type=int, default=96)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--passes", type=int, default=2)
    args = p.parse_args()
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from jaxcourse.models import decode
    from jaxcourse.models.transformer import GPT, GPTConfig
    from jaxcourse.quant import weights
    from jaxcourse.quant.model import QuantizedGPT

    n_layer, width = (int(x) for x in args.size.split("x"))
    cfg = GPTConfig(vocab_size=96, context=128, n_layer=n_layer, n_head=4, d_model=width,
                    pos="learned", norm="layernorm")
    params = nn.meta.unbox(GPT(cfg).init(jax.random.key(0),
                                         jnp.zeros((1, 1), jnp.int32))["params"])
    schemes = args.schemes.split(",")
    models = {s: (QuantizedGPT(cfg, s),
                  jax.jit(weights.quantize_params, static_argnums=1)(params, s))
              for s in schemes}
    best = dict.fromkeys(schemes, 0.0)
    for _ in range(args.passes):
        for s, (model, qparams) in models.items():
            seconds, _ = decode.time_generate(model, qparams, 1, 8, args.new_tokens,
                                              use_cache=True, repeats=args.repeats)
            best[s] = max(best[s], args.new_tokens / seconds)
    print(f"\n{args.size}, jax {jax.__version__}, batch 1, prompt 8, {args.new_tokens} new "
          f"tokens, best of {args.repeats} x {args.passes} passes\n")
    print("| scheme | model bytes | decode tokens/s | vs float32 |\n|---|---|---|---|")
    base = best.get("float32") or next(iter(best.values()))
    for s, (_, qparams) in models.items():
        print(f"| {s} | {weights.param_bytes(qparams)} | {best[s]:.1f} | "
              f"{best[s] / base:.2f}x |")


if __name__ == "__main__":
    main()
