"""benchmarks/gpu_suite.py --smoke: every GPU measurement's script runs on CPU (interpret mode
for the kernels, smoke presets for the chapters) and writes records that hold real numbers."""
import json
import math
import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_smoke_suite_writes_every_measurement(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAXCOURSE_CACHE": "off", "MPLBACKEND": "Agg",
           "XLA_FLAGS": "", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_suite.py"), "--smoke",
                           f"--out-dir={tmp_path}"], capture_output=True, text=True, env=env,
                          timeout=900, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    [index] = tmp_path.glob("gpu_suite_smoke_*.json")
    entries = json.loads(index.read_text())["measurements"]
    assert [e["name"] for e in entries] == ["selective_scan", "attention", "grouped_matmul",
                                            "gpt_mfu", "cifar_resnet_step"]
    results = {e["name"]: json.loads(pathlib.Path(e["file"]).read_text()) for e in entries}
    for name, result in results.items():
        assert {"device_kind", "jax", "date", "records"} <= set(result) and result["smoke"], name

    scan = {(r["impl"], r["pass"]): r for r in results["selective_scan"]["records"]}
    assert set(scan) == {(i, p) for i in ("analytic", "pallas", "associative")
                         for p in ("fwd", "fwd_bwd")}
    assert all("error" not in r and r["ms"] > 0 for r in scan.values())
    for impl in ("pallas", "associative"):  # the kernel (interpret mode) and XLA vs analytic
        for mode in ("fwd", "fwd_bwd"):
            # y is bfloat16 (relative rounding 4e-3); the gradients are float32 sums.
            assert scan[impl, mode]["max_rel_err"] < 1e-2, scan[impl, mode]

    attention = {(r["impl"], r["pass"]): r for r in results["attention"]["records"]}
    assert set(attention) == {(i, p) for i in ("xla", "cudnn", "mosaic", "triton", "tokamax")
                              for p in ("fwd", "fwd_bwd")}
    assert attention["cudnn", "fwd"]["error"] == "n/a"    # needs a GPU
    for impl in ("mosaic", "triton"):                     # both lowerings were timed and checked
        for mode in ("fwd", "fwd_bwd"):
            assert "error" not in attention[impl, mode], attention[impl, mode]
            # bf16 kernels vs XLA, out (and dq, dk, dv): a few ulps of values ~1.
            assert attention[impl, mode]["max_abs_err"] < 3e-2

    gmm = {(r["impl"], r["pass"]): r for r in results["grouped_matmul"]["records"]}
    assert set(gmm) == {(i, p) for i in ("ragged_dot", "pallas", "dense")
                        for p in ("fwd", "fwd_bwd")}
    assert all("error" not in r for r in gmm.values())
    # bf16 outputs of |values| ~ 3 round by ~1e-2; a wrong group or tile is off by O(1).
    assert gmm["pallas", "fwd"]["max_abs_err"] < 0.1

    [mfu] = results["gpt_mfu"]["records"]
    # XLA's FLOP count also holds softmax, norms and the optimizer: a little above the matmuls.
    assert 1.0 <= mfu["flops_per_token_xla"] / mfu["flops_per_token_by_hand"] < 1.3
    # MFU is what it claims to be: tokens/s x FLOPs per token / peak.
    achieved = mfu["tokens_per_second"] * mfu["flops_per_token_by_hand"]
    assert math.isclose(mfu["mfu"], achieved / mfu["peak_flops_per_second"], rel_tol=1e-6)
    assert mfu["mfu"] <= 1

    [resnet] = results["cifar_resnet_step"]["records"]
    assert resnet["batch"] == 32 and math.isfinite(resnet["step_ms"])
    assert 1.5 < resnet["final_loss"] < 4.0               # random labels: about ln 10 + smoothing
