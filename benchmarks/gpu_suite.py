"""Every GPU measurement of the project in one call, under 10 minutes on an H100/H200.

A lent GPU is rare and short (about 15 minutes a session), so this is the one command to run
on it. Each measurement runs as its own process (a crash or an out-of-memory in one leaves
the others their GPU) with a time limit, and writes raw JSON (benchmarks/records.py format)
into --out-dir; the suite adds an index file of what ran, how long it took and where its
records are. BENCHMARKS.md's GPU tables are filled in from these files.

    python benchmarks/gpu_suite.py [--out-dir benchmarks/results] [--only attention,gpt_mfu]
    python benchmarks/gpu_suite.py --smoke --out-dir /tmp/suite   # CPU, interpret mode: tests it

A lent machine has no network and lacks some packages: run benchmarks/gpu_wheels.sh here first
and carry .whl (the call: BENCHMARKS.md, "The GPU suite").

Measurements, in the order they run (seconds allowed each; 560 in all):
    selective_scan     chapter 10's Mosaic GPU selective scan vs the associative and analytic scans
    attention          pallas flash attention (Mosaic GPU and Triton) vs XLA, cuDNN, tokamax
    grouped_matmul     chapter 7's Mosaic GPU grouped matmul vs ragged_dot and a dense matmul
    gpt_mfu            GPT-2 124M bf16 training MFU (chapter 9's throughput lab)
    cifar_resnet_step  chapter 2's CIFAR-10 ResNet-18 training step time
Exit status 1 when any measurement failed or ran out of time (the others still ran).
"""
import argparse
import datetime
import json
import pathlib
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
MEASUREMENTS = {  # name: (script, seconds allowed on the GPU). selective_scan.py and
    # attention.py write their JSON after every cell: one cut off by its limit keeps that.
    "selective_scan": ("selective_scan.py", 90),   # first: issue 15's open goal
    "attention": ("attention.py", 220),
    "grouped_matmul": ("grouped_matmul.py", 70),
    "gpt_mfu": ("gpt_mfu.py", 100),
    "cifar_resnet_step": ("resnet_step.py", 80),
}
SMOKE_SECONDS = 300  # per measurement on CPU, where interpret mode is slow.


def run_one(name: str, out_dir: pathlib.Path, smoke: bool) -> dict:
    """Runs one measurement's script; its index entry."""
    script, allowed = MEASUREMENTS[name]
    out = out_dir / f"{name}{'_smoke' if smoke else ''}.json"
    cmd = [sys.executable, str(HERE / script), f"--out={out}"] + (["--smoke"] if smoke else [])
    start = time.perf_counter()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, check=False,
                              timeout=SMOKE_SECONDS if smoke else allowed)
        rc, tail = done.returncode, (done.stdout + done.stderr).strip().splitlines()[-3:]
    except subprocess.TimeoutExpired:
        rc, tail = None, [f"out of time after {SMOKE_SECONDS if smoke else allowed} s"]
    seconds = time.perf_counter() - start
    ok = rc == 0 and out.is_file()
    print(f"{name}: {'ok' if ok else 'FAILED'} in {seconds:.0f} s"
          + ("" if ok else ": " + " / ".join(tail)), flush=True)
    return {"name": name, "ok": ok, "returncode": rc, "seconds": seconds,
            "file": str(out) if out.is_file() else None, "tail": tail}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default=str(HERE / "results"))
    parser.add_argument("--only", default="", help="comma-separated names (default: all)")
    parser.add_argument("--smoke", action="store_true",
                        help="every measurement's --smoke mode on CPU: tests the suite")
    args = parser.parse_args(argv)
    names = [n for n in args.only.split(",") if n] or list(MEASUREMENTS)
    unknown = sorted(set(names) - set(MEASUREMENTS))
    if unknown:
        parser.error(f"unknown measurement {unknown[0]!r}; choose from {', '.join(MEASUREMENTS)}")
    out_dir = pathlib.Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    entries = [run_one(name, out_dir, args.smoke) for name in names]
    index = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
             "smoke": args.smoke, "measurements": entries}
    path = out_dir / f"gpu_suite{'_smoke' if args.smoke else ''}_{datetime.date.today()}.json"
    path.write_text(json.dumps(index, indent=1))
    print(f"wrote {path}; {sum(e['seconds'] for e in entries):.0f} s in all")
    return 0 if all(e["ok"] for e in entries) else 1


if __name__ == "__main__":
    sys.exit(main())
