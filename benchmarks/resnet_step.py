"""Chapter 2's CIFAR-10 ResNet-18 training step on one GPU (the `ch2_digits:gpu` preset).

The step time of the chapter's own training (shared loop, bf16, batch 512, Nesterov, crops and
flips, 50 steps per compiled call) on synthetic CIFAR-shaped data: 32x32x3 images, 10 classes.
Synthetic because the GPU machines have no network and no dataset; a step's cost does not
depend on the pixel values. Steps per second exclude the first (compiling) call.

    python benchmarks/resnet_step.py [--steps 300] [--out FILE.json]
    python benchmarks/resnet_step.py --smoke      # CPU, the smoke preset: tests the script

One record (benchmarks/records.py format): {"benchmark": "cifar_resnet_step", "arch", "width",
"stages", "batch", "precision", "steps", "step_ms", "images_per_second", "final_loss"}.
"""
import argparse
import pathlib
import sys
import tempfile

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import records as records_lib  # noqa: E402  (benchmarks/records.py)
from jaxcourse import ch2, config  # noqa: E402


def synthetic_cifar(n: int, seed: int = 0) -> dict:
    """train / val / test splits of random 32x32x3 images in [0, 1] with random labels."""
    rng = np.random.default_rng(seed)

    def split(m):
        return {"image": rng.random((m, 32, 32, 3), dtype=np.float32),
                "label": rng.integers(0, 10, m).astype(np.int32)}
    return {"train": split(n), "val": split(512), "test": split(512)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--out", default="", help="JSON path (default: benchmarks/results/)")
    parser.add_argument("--smoke", action="store_true", help="CPU smoke preset: tests the script")
    args = parser.parse_args(argv)
    records_lib.require_gpu("resnet_step.py", args.smoke)
    cfg, _, _ = config.load("ch2_digits:smoke" if args.smoke else "ch2_digits:gpu")
    steps = 4 if args.smoke else args.steps
    cfg = config.derive(cfg, {"train.steps": steps, "train.eval_every": 0,
                              "train.log_every": steps, "eval_batch_size": 256,
                              "train.steps_per_call": 1 if args.smoke else 50})
    data = synthetic_cifar(2048 if args.smoke else 50_000)
    with tempfile.TemporaryDirectory() as workdir:
        metrics = ch2.fit(cfg, pathlib.Path(workdir), data)
    m = cfg.model
    record = {"benchmark": "cifar_resnet_step", "arch": m.arch, "width": m.width,
              "stages": list(m.stages), "batch": cfg.train.batch_size,
              "precision": cfg.train.precision, "steps": steps,
              "step_ms": 1000.0 / metrics["steps_per_second"],
              "images_per_second": metrics["examples_per_second"],
              "final_loss": float(metrics["train/loss"])}
    print(record)
    records_lib.write("cifar_resnet_step", [record], args.smoke, args.out)
    return record


if __name__ == "__main__":
    main()
