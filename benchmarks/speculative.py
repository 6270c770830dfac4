"""Speculative decoding vs plain decoding of the same target, greedy, on CPU.

    python benchmarks/speculative.py [--text FILE] [--workdir runs/bench-spec] [--target 4x128]
                                     [--gammas 1,2,3,4,5,6,7,8] [--new-tokens 96] [--out FILE]

Target: by default chapter 4's CPU GPT shape (4 layers, width 128, 4 heads, learned
positions, LayerNorm, context 128; --target 4x256 a wider one); draft: 1 layer, width 64. Both are trained with chapter 4's own
`run_gpt` on the same character-level corpus (default /work/shared/data/tinyshakespeare.txt,
read in place) into --workdir, once; later runs load them (`jaxcourse.lm.load_model`).
f32 matmuls, so the target's chunked verify call and its one-token steps round alike.

For each of --prompts held-out prompts (16 characters of the corpus's last tenth):
    plain       models/decode.generate, greedy, one compiled prefill + scan of steps
    gamma=g     serve/speculative.speculative_generate, greedy, one compiled while_loop
Both produce the same --new-tokens tokens (checked: "equal output" is asserted); the time is
the best of --repeats calls after a compiling one, summed over prompts. Reported per gamma: the
acceptance rate (accepted / drafted draft tokens), tokens per target call, tokens/s and
the speed-up over plain decoding.
"""
import argparse
import json
import os
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

TARGET = {"n_layer": 4, "n_head": 4, "d_model": 128}
DRAFT = {"n_layer": 1, "n_head": 2, "d_model": 64}


def _train(path: pathlib.Path, text: str, shape: dict, steps: int):
    from jaxcourse import ch4
    from jaxcourse.lm import load_model
    from jaxcourse.lm.configs import pretrain_config

    if not (path / "model.json").is_file():
        cfg = pretrain_config("cpu")
        cfg.data.name = "text"
        cfg.data.path = text
        cfg.model.update(context=128, matmul="", **shape)
        cfg.train.steps = steps
        cfg.train.eval_every = steps
        cfg.train.log_every = steps
        cfg.lm.eval_batches = 20
        cfg.lm.monitor_batches = 0
        cfg.lm.sample_tokens = 16
        path.mkdir(parents=True, exist_ok=True)
        ch4.run_gpt(cfg, path)
    return load_model(path)


def _best(fn, repeats=3):
    import jax

    out = jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return min(times), out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--text", default="/work/shared/data/tinyshakespeare.txt")
    p.add_argument("--workdir", default="runs/bench-spec")
    p.add_argument("--target", default="4x128", help="LAYERSxWIDTH of the target (heads: "
                   "width / 32)")
    p.add_argument("--target-steps", type=int, default=1000)
    p.add_argument("--draft-steps", type=int, default=1000)
    p.add_argument("--gammas", default="1,2,3,4,5,6,7,8")
    p.add_argument("--new-tokens", type=int, default=96)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--repeats", type=int, default=5, help="timed calls per cell (best kept)")
    p.add_argument("--out", default="")
    args = p.parse_args()

    import jax
    import jax.numpy as jnp

    from jaxcourse.data import sources
    from jaxcourse.models import decode
    from jaxcourse.models.transformer import GPT
    from jaxcourse.serve.speculative import speculative_generate

    work = pathlib.Path(args.workdir)
    layers, width = (int(x) for x in args.target.split("x"))
    TARGET.update(n_layer=layers, d_model=width, n_head=max(1, width // 32))
    t_dir = work / ("target" if args.target == "4x128" else f"target-{args.target}")
    t_cfg, t_params, tok = _train(t_dir, args.text, TARGET, args.target_steps)
    d_cfg, d_params, d_tok = _train(work / "draft", args.text, DRAFT, args.draft_steps)
    if d_tok.vocab_size != tok.vocab_size:
        raise SystemExit("draft and target tokenizers differ")
    target, draft = GPT(t_cfg), GPT(d_cfg)
    text = sources.read_text(args.text)
    val = text[int(len(text) * 0.9):]
    step = len(val) // (args.prompts + 1)
    prompts = [jnp.asarray(tok.encode(val[i * step:i * step + 16]), jnp.int32)
               for i in range(1, args.prompts + 1)]
    n = args.new_tokens

    plain_s, plain_out = 0.0, []
    for pr in prompts:
        s, out = _best(lambda pr=pr: decode.generate(target, t_params, pr[None], None,
                                                     max_new_tokens=n, temperature=0.0),
                       args.repeats)
        plain_s += s
        plain_out.append(out[0].tolist())
    rows = [{"gamma": 0, "seconds": plain_s, "tokens_per_s": n * len(prompts) / plain_s}]
    print(f"plain: {rows[0]['tokens_per_s']:.1f} tokens/s", flush=True)
    for g in [int(x) for x in args.gammas.split(",")]:
        secs, acc, drafted, rounds = 0.0, 0, 0, 0
        for pr, want in zip(prompts, plain_out):
            s, (out, st) = _best(lambda pr=pr: speculative_generate(
                target, t_params, draft, d_params, pr, None, max_new_tokens=n, gamma=g,
                temperature=0.0), args.repeats)
            if out.tolist() != want:
                raise SystemExit(f"gamma={g}: speculative output differs from plain greedy")
            secs += s
            acc, drafted, rounds = (acc + int(st["accepted"]), drafted + int(st["drafted"]),
                                    rounds + int(st["rounds"]))
        row = {"gamma": g, "seconds": secs, "tokens_per_s": n * len(prompts) / secs,
               "acceptance": acc / drafted, "tokens_per_round": (n * len(prompts)) / rounds,
               "speedup": plain_s / secs}
        rows.append(row)
        print(f"gamma={g}: acceptance {row['acceptance']:.3f}, "
              f"{row['tokens_per_round']:.2f} tokens/target call, "
              f"{row['tokens_per_s']:.1f} tokens/s, {row['speedup']:.2f}x", flush=True)
    record = {"jax_version": jax.__version__, "date": time.strftime("%Y-%m-%d"),
              "load_average": os.getloadavg(), "new_tokens": n, "prompts": len(prompts),
              "target": TARGET, "draft": DRAFT, "rows": rows}
    print(json.dumps(record))
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
