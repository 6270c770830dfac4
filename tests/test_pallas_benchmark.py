"""benchmarks/attention.py refuses on CPU with one line (its --smoke run: test_gpu_suite.py)."""
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "attention.py"


def test_refuses_without_gpu():
    done = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True,
                          env={"JAX_PLATFORMS": "cpu", "PATH": ""}, timeout=120, check=False)
    assert done.returncode != 0
    assert "no GPU" in done.stderr and "--smoke" in done.stderr
    assert done.stderr.count("\n") == 1          # one line, no traceback
