"""benchmarks/grouped_matmul.py: refuses on CPU, and --smoke writes the raw JSON records."""
import importlib.util
import json
import pathlib
import subprocess
import sys

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "grouped_matmul.py"


def test_refuses_without_gpu():
    done = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True,
                          env={"JAX_PLATFORMS": "cpu", "PATH": "",
                               "PYTHONPATH": str(SCRIPT.parents[1])},
                          timeout=120, check=False)
    assert done.returncode != 0
    assert "no GPU" in done.stderr and "--smoke" in done.stderr
    assert done.stderr.count("\n") == 1          # one line, no traceback


def test_smoke_writes_records(tmp_path):
    spec = importlib.util.spec_from_file_location("grouped_matmul_benchmark", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "gmm.json"
    bench.main(["--smoke", f"--out={out}"])
    result = json.loads(out.read_text())
    assert {"device_kind", "jax", "date", "records"} <= set(result)
    cells = {(r["impl"], r["pass"]): r for r in result["records"]}
    assert set(cells) == {(i, p) for i in ("ragged_dot", "pallas", "dense")
                          for p in ("fwd", "fwd_bwd")}
    for record in cells.values():
        assert "error" not in record, record
    # The timed programs computed the right numbers: bf16 outputs of order 1 round by ~1e-2;
    # a wrong group or tile is off by O(1).
    for impl in ("ragged_dot", "pallas"):
        assert cells[(impl, "fwd")]["max_abs_err"] < 5e-2, cells[(impl, "fwd")]
        assert (record["m"], record["k"], record["n"], record["groups"]) == (200, 64, 64, 3)
    assert cells["pallas", "fwd"]["max_abs_err"] < 0.1   # bf16 output of |values| ~ 3
