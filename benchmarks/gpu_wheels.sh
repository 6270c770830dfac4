#!/usr/bin/env bash
# Downloads into .whl/ (git-ignored) the wheels the GPU suite needs beyond what a lent GPU
# machine's image has, so that a machine with no network can run it. The image has jax
# 0.11.2 with CUDA, numpy, scipy, matplotlib, tensorstore and most of the small packages;
# it lacks grain (and array_record, portpicker), ml-collections and tensorboardX, and
# its flax / optax / orbax / chex may be other versions. Every package here is pinned to
# constraints.txt's version (the one the test suite passed on). About 28 MiB: with the
# repository's 4 MiB, well under the 64 MiB a device call may carry. Not tokamax: it imports
# xprof (32 MiB, and more wheels of its own), so attention.py records tokamax as n/a there.
#
#   bash benchmarks/gpu_wheels.sh            # here, where pip reaches the registry
# then, in one device call that carries .whl (BENCHMARKS.md, "The GPU suite"):
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl &&
#   PYTHONPATH=/tmp/site:. python3 benchmarks/gpu_suite.py --out-dir "$OUT"
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
# tensorstore too: orbax-checkpoint 0.12.8 needs >= 0.1.84, and the image's is of unknown version.
PINNED="flax optax orbax-checkpoint chex grain array_record ml-collections portpicker tensorboardX
        tensorstore"
pins=()
for name in $PINNED; do
  pin=$(grep -i -m1 -E "^${name//[-_]/[-_]}==" constraints.txt) || { echo "gpu_wheels.sh: $name is not in constraints.txt" >&2; exit 1; }
  pins+=("$pin")
done
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 \
         manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
rm -rf .whl && mkdir .whl
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp "${platforms[@]}" -d .whl "${pins[@]}"
echo "gpu_wheels.sh: $(ls .whl | wc -l) wheels, $(du -sh .whl | cut -f1) in .whl/"
