"""Attention kernels on one GPU: pallas_kernels.flash_attention (Mosaic GPU and Triton
lowerings) vs jax.nn.dot_product_attention (XLA, cuDNN) and tokamax, in the same run.

Measures TFLOP/s of the forward and of forward+backward for head_dim 64 and 128, sequence
lengths 1k-16k, causal and not, in bfloat16, for:
    mosaic   pallas_kernels.flash_attention(impl="mosaic")   (TMA, wgmma, warp specialisation)
    triton   pallas_kernels.flash_attention(impl="triton")   (deprecated lowering, the fallback)
    xla      jax.nn.dot_product_attention(implementation="xla")
    cudnn    jax.nn.dot_product_attention(implementation="cudnn")
    tokamax  tokamax.dot_product_attention, when tokamax is importable

Shapes follow the FlashAttention-2 paper's benchmark (Section 4.1): batch * seq = 16k tokens,
hidden size 2048 (32 heads of 64 or 16 heads of 128). FLOPs counted as there: forward
4 * B * H * T * T * D (halved when causal), forward+backward 3.5 times that. Every record
also holds the largest difference from XLA's result in the same run (the output for "fwd",
the output and dq/dk/dv for "fwd_bwd"), so a GPU run doubles as a check of the compiled kernels.

    python benchmarks/attention.py [--out FILE.json] [--seqs 1024,...] [--head-dims 64,128]
    python benchmarks/attention.py --table FILE.json     # markdown table from a JSON (BENCHMARKS.md)
    python benchmarks/attention.py --smoke               # CPU, interpret mode: tests the script

Raw JSON (benchmarks/records.py format) goes to benchmarks/results/ or --out; one record per
(cell, implementation, pass): {"kernel": "attention", "impl", "pass": "fwd" | "fwd_bwd",
"dtype", "batch", "seq", "heads", "head_dim", "causal", "tflops", "max_abs_err"}, with
"error" (and tflops null) when that implementation failed or is unavailable.

Without a GPU (and without --smoke) it refuses: CPU timings of interpret mode mean nothing.
"""
import json
import pathlib
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import pallas_kernels as pk  # noqa: E402
import records as records_lib  # noqa: E402  (benchmarks/records.py)

TOKENS, HIDDEN = 16384, 2048
PASSES = ("fwd", "fwd_bwd")


def implementations(smoke):
    """name -> attention(q, k, v, causal) in the [B, T, H, D] layout; None if unavailable."""
    # xla first: it is the baseline the others' errors are measured against.
    interpret = True if smoke else None
    impls = {
        "xla": lambda q, k, v, causal: jax.nn.dot_product_attention(
            q, k, v, is_causal=causal, implementation="xla"),
        "cudnn": None if smoke else lambda q, k, v, causal: jax.nn.dot_product_attention(
            q, k, v, is_causal=causal, implementation="cudnn"),
        "mosaic": lambda q, k, v, causal: pk.flash_attention(
            q, k, v, causal=causal, impl="mosaic", interpret=interpret),
        "triton": lambda q, k, v, causal: pk.flash_attention(
            q, k, v, causal=causal, impl="triton", interpret=interpret),
        "tokamax": None,
    }
    try:
        import tokamax  # pylint: disable=import-outside-toplevel
        if not smoke:
            impls["tokamax"] = lambda q, k, v, causal: tokamax.dot_product_attention(
                q, k, v, is_causal=causal)
    except ImportError:
        pass
    return impls


def flops(batch, seq, heads, dim, causal, mode):
    f = 4 * batch * seq * seq * heads * dim / (2 if causal else 1)
    return f if mode == "fwd" else 3.5 * f


def _programs(attention, causal, cotangent):
    """The jitted forward, and forward+backward as out plus (dq, dk, dv) for a fixed dO."""
    fwd = jax.jit(lambda q, k, v: attention(q, k, v, causal))

    def fwd_bwd(q, k, v):
        out, vjp = jax.vjp(lambda *a: attention(*a, causal), q, k, v)
        return (out, *vjp(cotangent))
    return {"fwd": fwd, "fwd_bwd": jax.jit(fwd_bwd)}


def _max_err(got, want):
    leaves = zip(jax.tree.leaves(got), jax.tree.leaves(want))
    return max(float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
               for a, b in leaves)


def _short(err):
    line = records_lib.error_line(err)
    return "OOM" if "RESOURCE_EXHAUSTED" in line or "out of memory" in line.lower() else line


def measure(impls, seq, dim, causal, dtype, repeats, batch=None):
    """Records of one cell (shape, causal): every implementation, both passes."""
    heads = HIDDEN // dim if batch is None else 2
    batch = max(1, TOKENS // seq) if batch is None else batch
    keys = jax.random.split(jax.random.key(0), 4)
    q, k, v, cotangent = (jax.random.normal(key, (batch, seq, heads, dim), dtype)
                          for key in keys)
    cell = {"kernel": "attention", "dtype": jnp.dtype(dtype).name, "batch": batch, "seq": seq,
            "heads": heads, "head_dim": dim, "causal": causal}
    records, baseline = [], {}
    for name, attention in impls.items():
        programs = None if attention is None else _programs(attention, causal, cotangent)
        for mode in PASSES:
            record = {**cell, "impl": name, "pass": mode, "tflops": None, "max_abs_err": None}
            records.append(record)
            if programs is None:
                record["error"] = "n/a"
                continue
            try:
                seconds = records_lib.median_seconds(programs[mode], (q, k, v), repeats)
                result = programs[mode](q, k, v)
            except Exception as err:  # pylint: disable=broad-except
                record["error"] = _short(err)
                continue
            record["tflops"] = flops(batch, seq, heads, dim, causal, mode) / seconds / 1e12
            if name == "xla":
                baseline[mode] = result
            elif mode in baseline:
                record["max_abs_err"] = _max_err(result, baseline[mode])
    return records


def table(result: dict) -> str:
    """The BENCHMARKS.md table of one JSON result: a row per cell, fwd / fwd+bwd per impl."""
    records = result["records"]
    impls = list(dict.fromkeys(r["impl"] for r in records))
    cells = sorted({(r["head_dim"], r["seq"], r["batch"], r["heads"], r["causal"])
                    for r in records})
    by_key = {(r["head_dim"], r["seq"], r["batch"], r["heads"], r["causal"], r["impl"],
               r["pass"]): r for r in records}
    lines = [f"Attention TFLOP/s ({records[0]['dtype'] if records else '?'}, FLOPs as in "
             f"FlashAttention-2 Section 4.1) on {result['device_kind']}, jax {result['jax']}, "
             f"{result['date']}. Err: largest |difference| from XLA (out, and dq/dk/dv for "
             "fwd+bwd).",
             ""]
    if result.get("smoke"):
        lines[0] += " SMOKE RUN on CPU in interpret mode: these numbers are not performance."
    lines += ["| head_dim | seq | batch x heads | causal | " + " | ".join(
                  f"{i} fwd | {i} fwd+bwd | {i} err" for i in impls) + " |",
              "|" + "---|" * (4 + 3 * len(impls))]
    for dim, seq, batch, heads, causal in cells:
        row = []
        for impl in impls:
            pair = [by_key.get((dim, seq, batch, heads, causal, impl, p)) for p in PASSES]
            row += ["-" if r is None else r["error"] if "error" in r else f"{r['tflops']:.3g}"
                    for r in pair]
            errs = [r["max_abs_err"] for r in pair if r and r.get("max_abs_err") is not None]
            row.append(f"{max(errs):.1e}" if errs else "-")
        lines.append(f"| {dim} | {seq} | {batch}x{heads} | {causal} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = records_lib.kernel_parser(__doc__, repeats=5)
    # The goal's cells (head_dim 128, seq >= 4k) first: if the suite's time limit ends the run,
    # the JSON written after every cell already holds them. The table sorts the cells.
    parser.add_argument("--seqs", default="4096,8192,16384,2048,1024")
    parser.add_argument("--head-dims", default="128,64")
    parser.add_argument("--table", default="", metavar="FILE.json",
                        help="print the markdown table of an earlier run's JSON, run nothing")
    args = parser.parse_args(argv)
    if args.table:
        try:
            result = json.loads(pathlib.Path(args.table).read_text())
        except (OSError, ValueError) as err:
            sys.exit(f"benchmarks/attention.py: cannot read {args.table}: {err}")
        print(table(result), end="")
        return result
    records_lib.require_gpu("attention.py", args.smoke)
    impls = implementations(args.smoke)
    if args.smoke:
        grid = [(64, 128, True)]
    else:
        grid = [(int(d), int(s), causal) for d in args.head_dims.split(",")
                for s in args.seqs.split(",") for causal in (True, False)]
    records = []
    for dim, seq, causal in grid:
        records += measure(impls, seq, dim, causal, jnp.bfloat16,
                           1 if args.smoke else args.repeats, batch=1 if args.smoke else None)
        path = records_lib.write("attention", records, args.smoke, args.out)
        print(f"done head_dim={dim} seq={seq} causal={causal}", file=sys.stderr, flush=True)
    print(table(json.loads(path.read_text())), end="")
    return records


if __name__ == "__main__":
    main()
