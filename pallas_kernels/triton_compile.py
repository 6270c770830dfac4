"""Compile dumped Triton IR to an sm_90a cubin with the `triton` pip package; no GPU needed.

Step two of checking the GPU path without a GPU (step one, in the project's environment:
`python -m pallas_kernels.gpu_check DIR`). Run this file with an interpreter that has the
`triton` package (not a project dependency; e.g. a throwaway venv with `pip install triton`):

    /tmp/tritonvenv/bin/python pallas_kernels/triton_compile.py DIR [--arch 90]

It imports only triton and the standard library. For each kernel it prints shared memory,
registers per thread and spill bytes (from ptxas -v). Caveat: pip's Triton is not the Triton
inside XLA that compiles the kernel on a real GPU; agreement is likely, not guaranteed.
"""
import argparse
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import warnings


def ptxas_info(ptxas, ptx, arch):
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    done = subprocess.run([ptxas, "-v", f"-arch={arch}", f.name, "-o", os.devnull],
                          capture_output=True, text=True, check=True)
    regs = re.search(r"Used (\d+) registers", done.stderr)
    spills = re.search(r"(\d+) bytes spill stores", done.stderr)
    return int(regs.group(1)), int(spills.group(1))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory")
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90")
    args = parser.parse_args(argv)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    warnings.simplefilter("ignore")
    import triton  # pylint: disable=import-outside-toplevel
    from triton.backends.compiler import GPUTarget  # pylint: disable=import-outside-toplevel
    bin_dir = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    # The newest ptxas Triton ships (its plain `ptxas` may be older than the PTX it emits).
    ptxas = next(p for p in (bin_dir / "ptxas-blackwell", bin_dir / "ptxas") if p.exists())
    arch = f"sm_{args.arch}a" if args.arch == 90 else f"sm_{args.arch}"
    meta = json.loads((pathlib.Path(args.directory) / "meta.json").read_text())
    failed = 0
    print(f"triton {triton.__version__}, target {arch}")
    print("| kernel | warps | stages | shared bytes | registers | spill bytes |")
    print("|---|---|---|---|---|---|")
    for name, m in sorted(meta.items()):
        try:
            kernel = triton.compile(str(pathlib.Path(args.directory) / f"{name}.ttir"),
                                    target=GPUTarget("cuda", args.arch, 32),
                                    options={"num_warps": m["num_warps"],
                                             "num_stages": m["num_stages"]})
            regs, spills = ptxas_info(str(ptxas), kernel.asm["ptx"], arch)
            print(f"| {name} | {m['num_warps']} | {m['num_stages']} | "
                  f"{kernel.metadata.shared} | {regs} | {spills} |")
        except Exception as err:  # pylint: disable=broad-except
            failed += 1
            print(f"| {name} | FAILED: {str(err).strip().splitlines()[0][:200]} |||||")
    return failed


if __name__ == "__main__":
    sys.exit(1 if main() else 0)
