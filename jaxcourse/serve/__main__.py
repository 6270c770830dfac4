"""python -m jaxcourse.serve [--model DIR] [--host 127.0.0.1] [--port 8000] [--workdir DIR]
                           [--export DIR | --from-export DIR]

Serves a saved model (`jaxcourse.lm.save_model`'s folder, e.g. runs/ch4/gpt-cpu) over HTTP:
POST /v1/completions (OpenAI-compatible, streaming with "stream": true), GET /health,
GET /metrics. Without --model: runs/ch4/gpt-cpu if present, else a tiny GPT trained in
seconds into the workdir. Binds loopback unless --host says otherwise.
--export DIR writes the engine's steps as serialized StableHLO (jax.export) with the
parameters, tokenizer and a manifest, and exits; --from-export DIR serves such a folder
without importing any model code (serve/export.py).

    curl -s localhost:8000/v1/completions -H 'content-type: application/json' \\
         -d '{"prompt": "def ", "max_tokens": 32, "temperature": 0}'
"""
from __future__ import annotations

import argparse
import pathlib
import sys

from jaxcourse import machine
from jaxcourse.errors import UserError


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jaxcourse.serve", description=__doc__.split(
        "\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="folder of a saved model (default: runs/ch4/gpt-cpu, "
                   "else a tiny one trained into the workdir)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--workdir", default="runs/serve", help="where a tiny default model goes")
    p.add_argument("--slots", type=int, default=8, help="concurrent decode slots")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV cache block")
    p.add_argument("--decode-steps", type=int, default=8, help="tokens per slot per decode "
                   "call (one host round trip)")
    p.add_argument("--num-blocks", type=int, default=0,
                   help="KV blocks in the pool, the scratch block 0 included (0: every slot "
                   "can hold a whole context)")
    p.add_argument("--buckets", default="", help="prompt lengths prefill pads to, e.g. "
                   "16,64,256 (default: powers of two from 16, and the context)")
    p.add_argument("--export", metavar="DIR", help="write the exported engine to DIR and exit")
    p.add_argument("--from-export", metavar="DIR", help="serve an exported engine (no model "
                   "code; --slots, --block-size, --num-blocks, --buckets, --decode-steps "
                   "come from it)")
    p.add_argument("--no-cache", action="store_true", help="no persistent compilation cache")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse(sys.argv[1:] if argv is None else list(argv))
    try:
        if args.export and args.from_export:
            raise UserError("--export and --from-export exclude each other")
        machine.compilation_cache(not args.no_cache)
        # Imported here: jax starts after the compilation cache is configured.
        from jaxcourse.serve import metrics, server  # noqa: PLC0415

        if args.from_export:
            from jaxcourse.serve import export  # noqa: PLC0415

            eng, tok = export.load_exported(args.from_export, metrics=metrics.ServeMetrics())
            print(f"serve: export {args.from_export} (context {eng.cfg.context}, "
                  f"{len(eng.running)} slots) on http://{args.host}:{args.port}", flush=True)
            server.run_server(eng, tok, pathlib.Path(args.from_export).name, args.host,
                              args.port)
            return
        from jaxcourse.serve import default_model, engine  # noqa: PLC0415

        model_cfg, params, tok, source = default_model.find_or_train(
            args.model, pathlib.Path(args.workdir))
        eng = engine.Engine(model_cfg, params, slots=args.slots, block_size=args.block_size,
                            num_blocks=args.num_blocks, buckets=_buckets(args.buckets),
                            decode_steps=args.decode_steps, decode_text=tok.decode,
                            metrics=metrics.ServeMetrics())
        if args.export:
            from jaxcourse.serve import export  # noqa: PLC0415

            export.export_engine(eng, tok, args.export)
            print(f"serve: exported {source} to {args.export}", flush=True)
            return
        eng.warmup()
        name = pathlib.Path(source).name
        print(f"serve: {source} (context {model_cfg.context}, {args.slots} slots, "
              f"{eng.layout.num_blocks - 1} blocks of {args.block_size}) on "
              f"http://{args.host}:{args.port}", flush=True)
        server.run_server(eng, tok, name, args.host, args.port)
    except UserError as e:
        print(f"jaxcourse.serve: error: {e}", file=sys.stderr)
        raise SystemExit(1)


def _buckets(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(b) for b in text.split(",") if b.strip())
    except ValueError:
        raise UserError(f"--buckets={text!r} is not a comma-separated list of lengths") from None


if __name__ == "__main__":
    main()
