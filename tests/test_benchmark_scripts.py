"""The GPU benchmark scripts refuse on CPU with one line, and selective_scan.py's table (their
--smoke runs: test_gpu_suite.py)."""
import importlib.util
import pathlib
import subprocess
import sys

import pytest

BENCHMARKS = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.parametrize("script", ["attention.py", "grouped_matmul.py", "selective_scan.py"])
def test_refuses_without_gpu(script):
    done = subprocess.run([sys.executable, str(BENCHMARKS / script)], capture_output=True,
                          text=True, env={"JAX_PLATFORMS": "cpu", "PATH": "",
                                          "PYTHONPATH": str(BENCHMARKS.parent)},
                          timeout=120, check=False)
    assert done.returncode != 0
    assert "no GPU" in done.stderr and "--smoke" in done.stderr
    assert done.stderr.count("\n") == 1          # one line, no traceback


def test_selective_scan_table_has_the_speedup_over_associative():
    spec = importlib.util.spec_from_file_location("scan_bench", BENCHMARKS / "selective_scan.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    cell = {"kernel": "selective_scan", "dtype": "bfloat16", "batch": 4, "length": 4096,
            "dim": 1536, "state": 16, "pass": "fwd_bwd", "tokens_per_second": None}
    records = [{**cell, "impl": "analytic", "ms": 30.0, "max_rel_err": None},
               {**cell, "impl": "pallas", "ms": 2.5, "max_rel_err": 3e-3},
               {**cell, "impl": "associative", "ms": 20.0, "max_rel_err": 1e-6},
               {**cell, "length": 16384, "batch": 1, "impl": "analytic", "ms": 31.0,
                "max_rel_err": None},
               {**cell, "length": 16384, "batch": 1, "impl": "pallas", "ms": 2.0,
                "max_rel_err": 4e-3},
               {**cell, "length": 16384, "batch": 1, "impl": "associative", "ms": None,
                "max_rel_err": None, "error": "OOM"}]
    header, _, short, long = bench.table(records).splitlines()
    assert header.split(" | ")[3:6] == ["analytic ms", "pallas ms", "associative ms"]
    assert short.strip("| ").split(" | ") == ["4096", "4", "fwd_bwd", "30", "2.5", "20", "8.00x",
                                              "3.0e-03"]
    assert long.strip("| ").split(" | ") == ["16384", "1", "fwd_bwd", "31", "2", "OOM", "-",
                                             "4.0e-03"]
