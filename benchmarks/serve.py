"""Serving throughput and latency: the engine behind the HTTP server vs one request at a time.

    python benchmarks/serve.py [--model DIR | --size 4x128] [--requests 32] [--clients 1,8,32]
                               [--slots 32] [--decode-steps 8] [--max-tokens 48] [--repeats 1]
                               [--server process|thread] [--out FILE.json]

The same `--requests` greedy completions (prompts of 8, 16 or 32 characters of the embedded
stdlib corpus) are served three ways:
    generate      models/decode.generate, one request after the other (its compiled loop
                  for each prompt length is warmed up first and not timed)
    engine        all requests submitted at once to the engine, stepped in this thread
                  (generate and engine passes alternate, --repeats times each)
    http C=1..32  the server, `python -m jaxcourse.serve` in its own process (as deployed;
                  `--server thread`: engine thread + uvicorn in this process, sharing its
                  GIL with the clients), with C concurrent streaming clients
                  (httpx.AsyncClient), each taking the next request when its last one finished
Reported: output tokens/s over the whole batch of requests (wall clock), p50 / p99 time to
first token and inter-token latency as the clients see them, and the load average of the machine, since clients,
server and engine share its cores. Without --model, a random GPT of chapter 4's CPU size
(4 layers, width 128, context 128; `--size LxD` for another) over the corpus's characters: speed does not depend on
the weights.

The engine streams each request's tokens of one decode call (--decode-steps of them) as one
SSE chunk; the tokenizer is character level, so a client counts a chunk's characters as its
tokens. Inter-token latency: each chunk's wait since the previous one, spread over its tokens
(what a client reading tokens at a steady rate sees); "chunk gap" is the raw wait.
"""
import argparse
import asyncio
import contextlib
import json
import os
import pathlib
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _model(args):
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from jaxcourse.data import sources, tokenizers
    from jaxcourse.lm import load_model
    from jaxcourse.models.transformer import GPT, GPTConfig

    text = sources.embedded_text("stdlib")[:200_000]
    if args.model:
        cfg, params, tok = load_model(args.model)
    else:
        tok = tokenizers.CharTokenizer.from_text(text)
        n_layer, width = (int(x) for x in args.size.split("x"))
        cfg = GPTConfig(vocab_size=tok.vocab_size, context=128, n_layer=n_layer, n_head=4,
                        d_model=width, pos="learned", norm="layernorm")
        params = nn.meta.unbox(GPT(cfg).init(jax.random.key(0),
                                             jnp.zeros((1, 1), jnp.int32))["params"])
    rng = np.random.default_rng(0)
    prompts = []
    for i in range(args.requests):
        n = (8, 16, 32)[i % 3]
        start = int(rng.integers(0, len(text) - n))
        prompts.append(text[start:start + n])
    return cfg, params, tok, prompts


def _one_at_a_time(cfg, params, tok, prompts, max_tokens):
    """A timed pass of `generate` over the prompts, one after the other: () -> seconds."""
    import jax
    import jax.numpy as jnp

    from jaxcourse.models import decode
    from jaxcourse.models.transformer import GPT

    def run(p):
        return jax.block_until_ready(decode.generate(
            GPT(cfg), params, jnp.asarray([tok.encode(p)]), None, max_new_tokens=max_tokens,
            temperature=0.0))

    for n in sorted({len(p) for p in prompts}):  # compile every prompt length first
        run(next(p for p in prompts if len(p) == n))

    def timed():
        start = time.perf_counter()
        for p in prompts:
            run(p)
        return time.perf_counter() - start
    return timed


async def _clients(base, prompts, max_tokens, concurrency):
    import httpx

    todo = list(enumerate(prompts))
    ttft, itl, gaps, tokens = [], [], [], 0

    async def client(http):
        nonlocal tokens
        while todo:
            _, prompt = todo.pop(0)
            body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                    "stream": True}
            sent = last = time.perf_counter()
            async with http.stream("POST", f"{base}/v1/completions", json=body) as r:
                async for line in r.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    now = time.perf_counter()
                    n = len(json.loads(line[6:])["choices"][0]["text"])
                    if n and last == sent:
                        ttft.append(now - last)
                        itl.extend([0.0] * (n - 1))  # tokens that came with the first
                    elif n:
                        gaps.append(now - last)
                        itl.extend([(now - last) / n] * n)
                    tokens += n
                    last = now if n else last

    start = time.perf_counter()
    async with httpx.AsyncClient(timeout=600) as http:
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
    return time.perf_counter() - start, tokens, ttft, itl, gaps


def _served(cfg, params, tok, prompts, args, generate_pass):
    from jaxcourse.serve.engine import Engine, Request, SamplingParams
    from jaxcourse.serve.metrics import ServeMetrics

    engine = Engine(cfg, params, slots=args.slots, block_size=args.block_size,
                    decode_steps=args.decode_steps, decode_text=tok.decode,
                    metrics=ServeMetrics())
    engine.warmup()
    # generate and the engine take turns, best of each: on a shared machine the two passes
    # otherwise meet different loads.
    best = {"generate": float("inf"), "engine": float("inf")}
    for _ in range(args.repeats):
        best["generate"] = min(best["generate"], generate_pass())
        reqs = [Request(tok.encode(q), SamplingParams(max_tokens=args.max_tokens,
                                                      temperature=0.0)) for q in prompts]
        start = time.perf_counter()
        done = engine.complete(reqs)  # all at once, in this thread, no HTTP
        best["engine"] = min(best["engine"], time.perf_counter() - start)
    tokens = sum(len(d["tokens"]) for d in done)
    if tokens != len(prompts) * args.max_tokens:
        raise RuntimeError(f"the engine produced {tokens} tokens, not "
                           f"{len(prompts) * args.max_tokens}")
    rows = [{"mode": mode, "clients": c, "seconds": best[key], "tokens": tokens,
             "tokens_per_second": tokens / best[key]} for mode, c, key in (
                 ("generate, one at a time", 1, "generate"),
                 (f"engine, no HTTP, {args.slots} slots", len(prompts), "engine"))]
    print(rows, flush=True)
    with _server(args, engine, cfg, params, tok) as base:
        asyncio.run(_clients(base, prompts[:2], 4, 2))  # the HTTP path's first calls
        for c in args.clients:  # the repeat of the best throughput, with its latencies
            seconds, tokens, ttft, itl, gaps = min(
                (asyncio.run(_clients(base, prompts, args.max_tokens, c))
                 for _ in range(args.repeats)), key=lambda r: r[0])
            ms = lambda xs, q: round(1000 * float(np.percentile(xs, q)), 2) if xs else None
            rows.append({"mode": f"http ({args.server}), {args.slots} slots", "clients": c,
                         "seconds": seconds, "tokens": tokens,
                         "tokens_per_second": tokens / seconds,
                         "ttft_p50_ms": ms(ttft, 50), "ttft_p99_ms": ms(ttft, 99),
                         "itl_p50_ms": ms(itl, 50), "itl_p99_ms": ms(itl, 99),
                         "gap_p50_ms": ms(gaps, 50), "gap_p99_ms": ms(gaps, 99)})
            print(rows[-1], flush=True)
    return rows


@contextlib.contextmanager
def _server(args, engine, cfg, params, tok):
    """The server's base URL: `python -m jaxcourse.serve` on the model saved to a temporary
    folder, or (--server thread) the engine and uvicorn in threads of this process."""
    if args.server == "thread":
        from jaxcourse.serve.server import ServerThread, make_app

        engine.start()
        server = ServerThread(make_app(engine, tok, "bench"))
        try:
            yield f"http://127.0.0.1:{server.start()}"
        finally:
            server.stop()
            engine.stop()
        return
    import httpx

    from jaxcourse.lm import save_model

    with socket.socket() as s:  # a free port; the server binds it next
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        save_model(pathlib.Path(tmp), cfg, params, tok)
        proc = subprocess.Popen([sys.executable, "-m", "jaxcourse.serve", "--model", tmp,
                                 "--port", str(port), "--slots", str(args.slots),
                                 "--block-size", str(args.block_size),
                                 "--decode-steps", str(args.decode_steps), "--no-cache"],
                                cwd=REPO)
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 600
            while True:  # warmup compiles every step shape before uvicorn listens
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the server did not start (exit {proc.returncode})")
                try:
                    if httpx.get(f"{base}/health").status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.5)
            yield base
        finally:
            proc.terminate()
            proc.wait(timeout=30)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="")
    p.add_argument("--size", default="4x128", help="layers x width of the random GPT "
                   "(without --model)")
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--clients", default="1,8,32")
    p.add_argument("--slots", type=int, default=32)
    p.add_argument("--decode-steps", type=int, default=8)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--repeats", type=int, default=1, help="best of this many runs per row "
                   "(the machine may be shared)")
    p.add_argument("--server", choices=("process", "thread"), default="process",
                   help="the HTTP server in its own process, or in threads of this one")
    p.add_argument("--out", default="")
    args = p.parse_args()
    args.clients = [int(c) for c in args.clients.split(",")]
    import jax

    cfg, params, tok, prompts = _model(args)
    load = os.getloadavg()
    generate_pass = _one_at_a_time(cfg, params, tok, prompts, args.max_tokens)
    rows = _served(cfg, params, tok, prompts, args, generate_pass)
    load = [round(x, 2) for x in (*load, *os.getloadavg())]
    print(f"\n{jax.devices()[0].device_kind}, jax {jax.__version__}, {os.cpu_count()} cores, "
          f"load average before {load[:3]}, after {load[3:]}; model {args.model or 'random'} "
          f"{cfg.n_layer}x{cfg.d_model}, context {cfg.context}; {args.requests} requests, "
          f"prompts of 8/16/32 tokens, {args.max_tokens} new tokens each, greedy; "
          f"{args.decode_steps} tokens per decode call; best of {args.repeats}\n")
    print("| mode | clients | output tokens/s | vs one at a time | TTFT p50 / p99 ms "
          "| inter-token p50 / p99 ms | chunk gap p50 / p99 ms |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        lat = lambda a, b: f"{r[a]} / {r[b]}" if a in r else "-"
        ratio = r["tokens_per_second"] / rows[0]["tokens_per_second"]
        print(f"| {r['mode']} | {r['clients']} | {r['tokens_per_second']:.0f} | {ratio:.2f}x | "
              f"{lat('ttft_p50_ms', 'ttft_p99_ms')} | {lat('itl_p50_ms', 'itl_p99_ms')} | "
              f"{lat('gap_p50_ms', 'gap_p99_ms')} |")
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps({"load_average": load, "rows": rows},
                                                     indent=1))


if __name__ == "__main__":
    main()
