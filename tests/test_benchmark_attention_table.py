"""benchmarks/attention.py --table (its refusal on CPU: test_benchmark_scripts.py; its --smoke run:
test_gpu_suite.py)."""
import json
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "attention.py"


def test_table_is_generated_from_the_json(tmp_path):
    records = [{"kernel": "attention", "impl": impl, "pass": mode, "dtype": "bfloat16",
                "batch": 4, "seq": 4096, "heads": 16, "head_dim": 128, "causal": True,
                "tflops": tflops, "max_abs_err": err}
               for impl, mode, tflops, err in [("xla", "fwd", 100.0, None),
                                               ("xla", "fwd_bwd", 80.0, None),
                                               ("mosaic", "fwd", 400.0, 0.0078),
                                               ("mosaic", "fwd_bwd", 300.0, 0.0156)]]
    records.append({**records[0], "impl": "cudnn", "pass": "fwd", "tflops": None, "error": "OOM"})
    path = tmp_path / "attention.json"
    path.write_text(json.dumps({"device_kind": "NVIDIA H200", "jax": "0.11.2", "date": "d",
                                "smoke": False, "benchmark": "attention", "records": records}))
    done = subprocess.run([sys.executable, str(SCRIPT), f"--table={path}"], capture_output=True,
                          text=True, env={"JAX_PLATFORMS": "cpu", "PATH": ""}, timeout=120,
                          check=False)
    assert done.returncode == 0, done.stderr
    header, row = [line for line in done.stdout.splitlines() if line.startswith("| ")]
    assert header.split(" | ")[4:7] == ["xla fwd", "xla fwd+bwd", "xla err"]
    cells = row.strip("| ").split(" | ")
    assert cells[:4] == ["128", "4096", "4x16", "True"]
    assert cells[4:] == ["100", "80", "-", "400", "300", "1.6e-02", "OOM", "-", "-"]
    assert "NVIDIA H200" in done.stdout
