"""The raw-JSON format every GPU benchmark writes, and the refusal to time interpret mode on CPU.

One file per measurement under benchmarks/results/ (or --out):
    {"device_kind": jax.devices()[0].device_kind, "jax": jax.__version__, "date": ISO UTC,
     "smoke": bool, "benchmark": name, "records": [one dict per measured cell]}
BENCHMARKS.md's GPU tables are filled in from these files.
"""
import argparse
import datetime
import json
import pathlib
import statistics
import sys
import time

import jax

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def kernel_parser(doc: str, repeats: int) -> argparse.ArgumentParser:
    """The flags of every kernel benchmark: --repeats, --out and --smoke (add your own)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--out", default="", help="JSON path (default: benchmarks/results/)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shape in interpret mode on CPU: tests the script, not speed")
    return parser


def require_gpu(script: str, smoke: bool) -> None:
    """Exits with one line unless a GPU is present or this is a --smoke run."""
    platform = jax.devices()[0].platform
    if platform != "gpu" and not smoke:
        sys.exit(f"benchmarks/{script}: no GPU (jax backend is {platform!r}); run it on a GPU, "
                 "or pass --smoke to exercise the script on a tiny shape")


def write(name: str, records: list[dict], smoke: bool, out: str = "") -> pathlib.Path:
    """Writes the records with the device, jax version and date; returns the path."""
    result = {"device_kind": jax.devices()[0].device_kind, "jax": jax.__version__,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "smoke": smoke, "benchmark": name, "records": records}
    path = pathlib.Path(out) if out else RESULTS / (
        f"{name}_{'smoke_' if smoke else ''}{datetime.date.today().isoformat()}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {len(records)} records to {path}")
    return path


def error_line(err: Exception) -> str:
    """The first line of an exception, short enough for a record or a table cell."""
    lines = str(err).strip().splitlines()
    return (lines[0] if lines else type(err).__name__)[:120]


def median_seconds(fn, args, repeats: int) -> float:
    """Median wall seconds of `fn(*args)` over `repeats` calls, after two untimed calls (the
    first compiles)."""
    for _ in range(2):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)
