"""benchmarks/attention.py: refuses on CPU, and its --smoke mode produces a full table."""
import importlib.util
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


def test_smoke_run_writes_table(tmp_path):
    spec = importlib.util.spec_from_file_location("attention_benchmark", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "attention.md"
    results = bench.main(["--smoke", f"--out={out}"])
    [(key, (_, row))] = results
    assert key == (64, 128, True)
    assert row["cudnn"] == "n/a"                  # needs a GPU
    xla_fwd, xla_all, _ = row["xla"]
    pallas_fwd, pallas_all, err = row["pallas"]
    assert min(xla_fwd, xla_all, pallas_fwd, pallas_all) > 0
    assert err < 2e-2                             # bf16 kernel vs XLA, a few ulps at most
    text = out.read_text()
    assert "SMOKE RUN" in text and "| 64 | 128 | 1x2 | True |" in text
