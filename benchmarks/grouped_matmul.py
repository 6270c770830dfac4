"""Grouped matmul on one GPU: pallas_kernels.grouped_matmul vs lax.ragged_dot vs a dense matmul.

TFLOP/s of the forward and of forward+backward, in bfloat16, at MoE-like shapes: M routed
token rows split over G experts (multinomial group sizes, so groups are uneven and not
tile-aligned), each a [K, N] matmul. FLOPs: 2*M*K*N forward, 3x that forward+backward. The dense
baseline is one [M, K] @ [K, N] matmul of the same FLOPs, the ceiling a grouped matmul aims at
(issue 14's goal: pallas >= 0.8x dense). Each record also has the largest difference of the
output from ragged_dot's, so a GPU run doubles as a check of the compiled kernels.

Raw JSON goes to benchmarks/results/ as {"device_kind", "jax", "date", "records": [...]}, one
record per cell: {"kernel": "grouped_matmul", "impl", "pass": "fwd" | "fwd_bwd", "dtype", "m",
"k", "n", "groups", "tflops", "max_abs_err"} (tflops null and "error" set when a cell fails).

    python benchmarks/grouped_matmul.py [--out FILE.json]
    python benchmarks/grouped_matmul.py --smoke --out /tmp/gmm.json   # CPU, interpret mode

Without a GPU (and without --smoke) it refuses: CPU timings of interpret mode mean nothing.
"""
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import records as records_lib  # noqa: E402  (benchmarks/records.py)
from pallas_kernels.grouped_matmul import BlockSizes, grouped_matmul  # noqa: E402

# (M, K, N, G): Mixtral-like (8 experts, d 4096 -> 14336 split), DeepSeek-like fine-grained
# (64 experts of width 1408 on d 2048), and a square mid-size case.
SHAPES = [(16384, 4096, 2048, 8), (16384, 2048, 1408, 64), (8192, 4096, 4096, 16)]
SMOKE_SHAPE = (200, 64, 64, 3)
SMOKE_BLOCKS = BlockSizes(block_m=64, block_n=64, block_k=64, num_stages=2)


def implementations(smoke):
    """name -> f(lhs [M, K], rhs [G, K, N], sizes [G]) -> [M, N]."""
    blocks = SMOKE_BLOCKS if smoke else None
    return {
        "ragged_dot": jax.lax.ragged_dot,
        "pallas": lambda lhs, rhs, sizes: grouped_matmul(lhs, rhs, sizes, block_sizes=blocks,
                                                         interpret=True if smoke else None),
        # Same FLOPs as one dense matmul: all rows through the first expert's weights.
        "dense": lambda lhs, rhs, sizes: lhs @ rhs[0],
    }


def operands(m, k, n, g, dtype, seed=0):
    rng = np.random.default_rng(seed)
    sizes = rng.multinomial(m, np.full(g, 1.0 / g)).astype(np.int32)
    keys = jax.random.split(jax.random.key(seed), 2)
    lhs = jax.random.normal(keys[0], (m, k), dtype)
    rhs = jax.random.normal(keys[1], (g, k, n), dtype) * float(k ** -0.5)
    return lhs, rhs, jnp.asarray(sizes)


def measure(impls, shape, dtype, repeats):
    """Records of one shape: every impl, forward and forward+backward."""
    m, k, n, g = shape
    lhs, rhs, sizes = operands(m, k, n, g, dtype)
    want = jax.lax.ragged_dot(lhs.astype(jnp.float32), rhs.astype(jnp.float32), sizes)
    records = []
    for name, fn in impls.items():
        fwd = jax.jit(fn)
        loss = lambda a, b, s, fn=fn: fn(a, b, s).astype(jnp.float32).sum()  # noqa: E731
        fwd_bwd = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
        for pass_, program, flops in (("fwd", fwd, 2 * m * k * n),
                                      ("fwd_bwd", fwd_bwd, 6 * m * k * n)):
            record = {"kernel": "grouped_matmul", "impl": name, "pass": pass_,
                      "dtype": jnp.dtype(dtype).name, "m": m, "k": k, "n": n, "groups": g,
                      "tflops": None, "max_abs_err": None}
            try:
                seconds = records_lib.median_seconds(program, (lhs, rhs, sizes), repeats)
                record["tflops"] = flops / seconds / 1e12
                if pass_ == "fwd" and name != "dense":
                    got = fwd(lhs, rhs, sizes).astype(jnp.float32)
                    record["max_abs_err"] = float(jnp.max(jnp.abs(got - want)))
            except Exception as err:  # pylint: disable=broad-except
                record["error"] = records_lib.error_line(err)
            records.append(record)
            print(f"done {name} {pass_} {shape}: {record['tflops']}", file=sys.stderr)
    return records


def main(argv=None):
    parser = records_lib.kernel_parser(__doc__, repeats=10)
    args = parser.parse_args(argv)
    records_lib.require_gpu("grouped_matmul.py", args.smoke)
    impls = implementations(args.smoke)
    records = []
    for shape in [SMOKE_SHAPE] if args.smoke else SHAPES:
        records += measure(impls, shape, jnp.bfloat16, 1 if args.smoke else args.repeats)
    path = records_lib.write("grouped_matmul", records, args.smoke, args.out)
    return json.loads(path.read_text())


if __name__ == "__main__":
    main()
