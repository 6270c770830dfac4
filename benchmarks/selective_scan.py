"""Mamba's selective scan on one GPU: pallas_kernels.selective_scan vs the XLA scans, in one run.

Times the forward and forward+backward of `jaxcourse.models.ssm.selective_scan` at a Mamba
layer's shapes (inner width 1536, state 16, as Mamba-130M; the mixer's options on: D, z,
delta_bias, softplus), batch * length = 16k tokens, lengths 1k-16k, bfloat16 activations:
    pallas       impl="pallas": the Mosaic GPU kernel, recomputing backward (custom_vjp)
    associative  impl="associative": lax.associative_scan over [b, l, dim, n] states
    analytic     impl="analytic": the library default, a scan over chunks with a fused backward
Issue 15's goal: pallas at least 5x associative at length >= 4k (forward+backward is what
training runs). Every record also holds the largest difference from the analytic scan in the
same run, relative to the largest value (y for "fwd"; y and the gradients of u, delta, A, B,
C, D, z, delta_bias for "fwd_bwd"), so a GPU run doubles as a check of the compiled kernels.

    python benchmarks/selective_scan.py [--out FILE.json] [--lengths 4096,...] [--repeats 5]
    python benchmarks/selective_scan.py --smoke --out /tmp/scan.json   # CPU, interpret mode

Raw JSON (benchmarks/records.py format), written after every length, one record per
(length, impl, pass): {"kernel": "selective_scan", "impl", "pass": "fwd" | "fwd_bwd", "dtype",
"batch", "length", "dim", "state", "ms", "tokens_per_second", "max_rel_err"}, with "error"
(and ms null) when that implementation failed. The table printed at the end has pallas'
speedup over associative per length and pass.

Without a GPU (and without --smoke) it refuses: CPU timings of interpret mode mean nothing.
"""
import pathlib
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import records as records_lib  # noqa: E402  (benchmarks/records.py)
from jaxcourse.models.ssm import selective_scan  # noqa: E402

TOKENS, DIM, STATE = 16384, 1536, 16
SMOKE = dict(batch=1, length=20, dim=128, state=4)  # 20: not a multiple of the kernel's chunk
IMPLS = ("analytic", "pallas", "associative")       # analytic first: the baseline of the errors
PASSES = ("fwd", "fwd_bwd")
ARGS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def operands(batch, length, dim, state, dtype, seed=0):
    """The scan's inputs at a trained Mamba layer's scales, and a cotangent for y."""
    k = jax.random.split(jax.random.key(seed), 9)
    act = lambda key: jax.random.normal(key, (batch, length, dim), dtype)  # noqa: E731
    return dict(
        u=act(k[0]), delta=act(k[1]), z=act(k[2]),
        # S4D-real init: A_n = -(n + 1); B, C per step and shared over channels.
        A=-jnp.broadcast_to(jnp.arange(1, state + 1, dtype=jnp.float32), (dim, state)),
        B=jax.random.normal(k[3], (batch, length, state), dtype),
        C=jax.random.normal(k[4], (batch, length, state), dtype),
        D=jnp.ones((dim,), jnp.float32),
        # softplus(delta + bias) around 0.001-0.1, Mamba's dt range.
        delta_bias=jax.random.uniform(k[5], (dim,), jnp.float32, -7.0, -2.3),
    ), jax.random.normal(k[6], (batch, length, dim), dtype)


def programs(impl, cotangent):
    """The jitted forward, and forward+backward as y plus the gradients of every input."""
    def scan(*args):
        return selective_scan(*args, delta_softplus=True, impl=impl)

    def fwd_bwd(*args):
        y, vjp = jax.vjp(scan, *args)
        return (y, *vjp(cotangent))
    return {"fwd": jax.jit(scan), "fwd_bwd": jax.jit(fwd_bwd)}


def max_rel_err(got, want):
    """Largest |difference| over the leaves, each relative to that leaf's largest |value|."""
    errs = []
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        a, b = a.astype(jnp.float32), b.astype(jnp.float32)
        errs.append(float(jnp.max(jnp.abs(a - b)) / jnp.maximum(jnp.max(jnp.abs(b)), 1e-30)))
    return max(errs)


def measure(batch, length, dim, state, dtype, repeats):
    """Records of one shape: every implementation, both passes."""
    inputs, cotangent = operands(batch, length, dim, state, dtype)
    args = tuple(inputs[name] for name in ARGS)
    cell = {"kernel": "selective_scan", "dtype": jnp.dtype(dtype).name, "batch": batch,
            "length": length, "dim": dim, "state": state}
    records, baseline = [], {}
    for impl in IMPLS:
        progs = programs(impl, cotangent)
        for mode in PASSES:
            record = {**cell, "impl": impl, "pass": mode, "ms": None, "tokens_per_second": None,
                      "max_rel_err": None}
            records.append(record)
            try:
                seconds = records_lib.median_seconds(progs[mode], args, repeats)
                result = progs[mode](*args)
            except Exception as err:  # pylint: disable=broad-except
                record["error"] = records_lib.error_line(err)
                continue
            record["ms"] = seconds * 1e3
            record["tokens_per_second"] = batch * length / seconds
            if impl == "analytic":
                baseline[mode] = result
            elif mode in baseline:
                record["max_rel_err"] = max_rel_err(result, baseline[mode])
            print(f"done {impl} {mode} length={length}: {record['ms']:.3g} ms", file=sys.stderr,
                  flush=True)
    return records


def table(records) -> str:
    """A markdown row per (length, pass): ms per impl and pallas' speedup over associative."""
    by = {(r["length"], r["pass"], r["impl"]): r for r in records}
    lines = ["| length | batch | pass | " + " | ".join(f"{i} ms" for i in IMPLS)
             + " | pallas vs associative | pallas err |", "|" + "---|" * (len(IMPLS) + 5)]
    for length, mode in sorted({(r["length"], r["pass"]) for r in records}):
        cells = [by[length, mode, impl] for impl in IMPLS]
        ms = {r["impl"]: r["ms"] for r in cells}
        speedup = (f"{ms['associative'] / ms['pallas']:.2f}x"
                   if ms["pallas"] and ms["associative"] else "-")
        err = by[length, mode, "pallas"]["max_rel_err"]
        lines.append(f"| {length} | {cells[0]['batch']} | {mode} | " + " | ".join(
            r.get("error", "-") if r["ms"] is None else f"{r['ms']:.3g}" for r in cells)
            + f" | {speedup} | {'-' if err is None else f'{err:.1e}'} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = records_lib.kernel_parser(__doc__, repeats=5)
    # The goal's lengths (>= 4k) first: if the suite's time limit ends the run, the JSON
    # written after every length already holds them.
    parser.add_argument("--lengths", default="4096,16384,8192,1024")
    args = parser.parse_args(argv)
    records_lib.require_gpu("selective_scan.py", args.smoke)
    shapes = ([SMOKE] if args.smoke else
              [dict(batch=max(1, TOKENS // int(n)), length=int(n), dim=DIM, state=STATE)
               for n in args.lengths.split(",")])
    records = []
    for shape in shapes:
        records += measure(**shape, dtype=jnp.bfloat16, repeats=1 if args.smoke else args.repeats)
        records_lib.write("selective_scan", records, args.smoke, args.out)
    print(table(records), end="")
    return records


if __name__ == "__main__":
    main()
