"""GPT-2 small (124M, context 1024) bf16 training MFU on one GPU: chapter 9's throughput lab.

Runs `jaxcourse.ch9`'s `throughput` experiment with the `ch9_throughput:gpu` preset (cuDNN
attention, bf16, batch 16, 60 steps of 10 per compiled call, character tokens of the stdlib
corpus) and records what it measures: FLOPs per token three ways (by hand, 6N + 12LTd, XLA's
count), tokens per second, step time and MFU against the data-sheet bf16 peak.

    python benchmarks/gpt_mfu.py [--out FILE.json]
    python benchmarks/gpt_mfu.py --smoke      # CPU, the smoke preset: tests the script

One record (benchmarks/records.py format) holding the experiment's summary plus "preset".
"""
import argparse
import pathlib
import sys
import tempfile

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import records as records_lib  # noqa: E402  (benchmarks/records.py)
from jaxcourse import ch9, config  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="", help="JSON path (default: benchmarks/results/)")
    parser.add_argument("--smoke", action="store_true", help="CPU smoke preset: tests the script")
    args = parser.parse_args(argv)
    records_lib.require_gpu("gpt_mfu.py", args.smoke)
    preset = "smoke" if args.smoke else "gpu"
    cfg, _, _ = config.load(f"ch9_throughput:{preset}")
    with tempfile.TemporaryDirectory() as workdir:
        out = ch9.run_throughput(cfg, pathlib.Path(workdir))
    record = {"benchmark": "gpt_mfu", "preset": f"ch9_throughput:{preset}",
              "n_layer": cfg.model.n_layer, "d_model": cfg.model.d_model,
              "context": cfg.model.context, "batch": cfg.train.batch_size, **out}
    records_lib.write("gpt_mfu", [record], args.smoke, args.out)
    return record


if __name__ == "__main__":
    main()
