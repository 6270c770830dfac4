"""Attention kernels on one GPU: pallas_kernels.flash_attention vs jax.nn.dot_product_attention.

Measures TFLOP/s of the forward and of forward+backward for head_dim 64 and 128, sequence
lengths 1k-16k, causal and not, in bfloat16, for: this repo's Pallas kernel (Triton lowering),
jax.nn.dot_product_attention(implementation="xla") and (implementation="cudnn"), and
tokamax.dot_product_attention when tokamax is importable. All in the same run.

Shapes follow the FlashAttention-2 paper's benchmark (Section 4.1): batch * seq = 16k tokens,
hidden size 2048 (32 heads of 64 or 16 heads of 128). FLOPs counted as there: forward
4 * B * H * T * T * D (halved when causal), forward+backward 3.5 times that.
Each cell also records the largest difference from the XLA result (output and dq), so the
first GPU run doubles as a correctness check of the compiled kernels.

    python benchmarks/attention.py [--table attention.md] [--out FILE.json] [--seqs 1024,...]
    python benchmarks/attention.py --smoke     # CPU: a tiny interpret-mode shape, tests the script

Raw JSON (benchmarks/records.py format) goes to benchmarks/results/ or --out: one record per
implementation and cell, {"kernel": "attention", "impl", "head_dim", "seq", "batch", "heads",
"causal", "dtype", "fwd_tflops", "fwd_bwd_tflops", "max_abs_err"} ("error" when it failed).

Without a GPU (and without --smoke) it refuses: CPU timings of interpret mode mean nothing.
"""
import argparse
import datetime
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import pallas_kernels as pk  # noqa: E402
import records as records_lib  # noqa: E402  (benchmarks/records.py)

TOKENS, HIDDEN = 16384, 2048


def implementations(smoke):
    """name -> attention(q, k, v, causal) in the [B, T, H, D] layout; None if unavailable."""
    # xla first: it is the baseline the others' errors are measured against.
    impls = {
        "xla": lambda q, k, v, causal: jax.nn.dot_product_attention(
            q, k, v, is_causal=causal, implementation="xla"),
        "cudnn": None if smoke else lambda q, k, v, causal: jax.nn.dot_product_attention(
            q, k, v, is_causal=causal, implementation="cudnn"),
        "pallas": lambda q, k, v, causal: pk.flash_attention(q, k, v, causal=causal,
                                                             interpret=True if smoke else None),
    }
    try:
        import tokamax  # pylint: disable=import-outside-toplevel
        impls["tokamax"] = None if smoke else lambda q, k, v, causal: tokamax.dot_product_attention(
            q, k, v, is_causal=causal)
    except ImportError:
        pass
    return impls


def flops(batch, seq, heads, dim, causal, mode):
    f = 4 * batch * seq * seq * heads * dim / (2 if causal else 1)
    return f if mode == "fwd" else 3.5 * f


def time_call(fn, args, repeats):
    """Median seconds of one call after a compile + warm-up call."""
    jax.block_until_ready(fn(*args))
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _programs(attention, causal):
    fwd = jax.jit(lambda q, k, v: attention(q, k, v, causal))

    def loss(q, k, v):
        return attention(q, k, v, causal).astype(jnp.float32).sum()
    return fwd, jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


def _short(err):
    line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return ("OOM" if "RESOURCE_EXHAUSTED" in line or "out of memory" in line.lower()
            else line[:60])


def measure(impls, seq, dim, causal, dtype, repeats, batch=None):
    """One table row: {impl: (fwd TFLOP/s, fwd+bwd TFLOP/s, max err vs xla) or error}."""
    heads = HIDDEN // dim if batch is None else 2
    batch = max(1, TOKENS // seq) if batch is None else batch
    keys = jax.random.split(jax.random.key(0), 3)
    q, k, v = (jax.random.normal(key, (batch, seq, heads, dim), dtype) for key in keys)
    row, baseline = {}, None
    for name, attention in impls.items():
        if attention is None:
            row[name] = "n/a"
            continue
        try:
            fwd, fwd_bwd = _programs(attention, causal)
            t_fwd = time_call(fwd, (q, k, v), repeats)
            t_all = time_call(fwd_bwd, (q, k, v), repeats)
            out, (dq, _, _) = fwd(q, k, v), fwd_bwd(q, k, v)[1]
        except Exception as err:  # pylint: disable=broad-except
            row[name] = _short(err)
            continue
        if name == "xla":
            baseline = (out, dq)
        err = None if baseline is None else max(
            float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
            for a, b in zip((out, dq), baseline))
        row[name] = (flops(batch, seq, heads, dim, causal, "fwd") / t_fwd / 1e12,
                     flops(batch, seq, heads, dim, causal, "fwd+bwd") / t_all / 1e12, err)
    return (batch, heads), row


def table(results, names, header):
    lines = header + ["", "| head_dim | seq | batch x heads | causal | "
                      + " | ".join(f"{n} fwd | {n} fwd+bwd" for n in names)
                      + " | pallas max err vs xla (out, dq) |",
                      "|" + "---|" * (5 + 2 * len(names))]
    for (dim, seq, causal), ((batch, heads), row) in results:
        cells = []
        for n in names:
            cell = row[n]
            cells += ([f"{cell[0]:.3g}", f"{cell[1]:.3g}"] if isinstance(cell, tuple)
                      else [cell, cell])
        pallas = row.get("pallas")
        err = pallas[2] if isinstance(pallas, tuple) and pallas[2] is not None else None
        lines.append(f"| {dim} | {seq} | {batch}x{heads} | {causal} | " + " | ".join(cells)
                     + f" | {'-' if err is None else f'{err:.1e}'} |")
    return "\n".join(lines) + "\n"


def json_records(results) -> list[dict]:
    """One record per (cell, implementation) of `measure`'s rows."""
    out = []
    for (dim, seq, causal), ((batch, heads), row) in results:
        for impl, cell in row.items():
            record = {"kernel": "attention", "impl": impl, "head_dim": dim, "seq": seq,
                      "batch": batch, "heads": heads, "causal": causal, "dtype": "bfloat16",
                      "fwd_tflops": None, "fwd_bwd_tflops": None, "max_abs_err": None}
            if isinstance(cell, tuple):
                record.update(fwd_tflops=cell[0], fwd_bwd_tflops=cell[1], max_abs_err=cell[2])
            else:
                record["error"] = cell
            out.append(record)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqs", default="1024,2048,4096,8192,16384")
    parser.add_argument("--head-dims", default="64,128")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--table", default="", help="also write the markdown table here")
    parser.add_argument("--out", default="", help="JSON path (default: benchmarks/results/)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shape in interpret mode on CPU: tests the script, not speed")
    args = parser.parse_args(argv)
    records_lib.require_gpu("attention.py", args.smoke)
    device = jax.devices()[0]
    impls = implementations(args.smoke)
    if args.smoke:
        grid = [(64, 128, True)]
    else:
        grid = [(int(d), int(s), causal) for d in args.head_dims.split(",")
                for s in args.seqs.split(",") for causal in (False, True)]
    results = []
    for dim, seq, causal in grid:
        results.append(((dim, seq, causal), measure(
            impls, seq, dim, causal, jnp.bfloat16, 1 if args.smoke else args.repeats,
            batch=1 if args.smoke else None)))
        print(f"done head_dim={dim} seq={seq} causal={causal}", file=sys.stderr)
    header = [f"Attention TFLOP/s (bfloat16, FLOPs as in FlashAttention-2 Section 4.1) on "
              f"{device.device_kind}, jax {jax.__version__}, "
              f"{datetime.date.today().isoformat()}."]
    if args.smoke:
        header.append("SMOKE RUN on CPU, pallas in interpret mode: these numbers are not "
                      "performance.")
    text = table(results, list(impls), header)
    print(text)
    if args.table:
        with open(args.table, "w", encoding="utf-8") as f:
            f.write(text)
    records_lib.write("attention", json_records(results), args.smoke, args.out)
    return results


if __name__ == "__main__":
    main()
