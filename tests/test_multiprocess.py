"""Two processes x 2 CPU devices (gloo collectives, via tpu_gpu_launch/local.py) train the
smoke GPT to the same losses as one process with 4 devices, each process loading only its
own half of every batch."""
import json
import os
import pathlib
import subprocess
import sys

import pytest

from jaxcourse import ch9

REPO = pathlib.Path(__file__).resolve().parents[1]
CMD = [sys.executable, "-m", "jaxcourse.ch9", "--config=configs/ch9_train.py:smoke",
       "--config.train.steps=3"]


def _launch(cmd, env, timeout=240):
    return subprocess.run(
        [sys.executable, "tpu_gpu_launch/local.py", "--processes", "2",
         "--devices-per-process", "2", "--platform", "cpu", "--timeout", str(timeout), "--",
         *cmd], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout + 60)


def _env():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def _losses(workdir: pathlib.Path) -> list[float]:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [r["train/loss"] for r in rows if "train/loss" in r]


@pytest.mark.multiprocess
def test_two_processes_match_one_process(tmp_path):
    two = _launch([*CMD, f"--workdir={tmp_path / 'two'}"], _env())
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    assert "[0] jaxcourse.ch9: wrote" in two.stdout  # only process 0 writes the summary
    assert "[1] jaxcourse.ch9: process 1 finished" in two.stdout  # process 1 ran to the end
    # One process, 4 of this test process's 8 simulated devices.
    ch9.main([*CMD[3:], "--config.mesh.devices=4", f"--workdir={tmp_path / 'one'}"])
    got, want = _losses(tmp_path / "two"), _losses(tmp_path / "one")
    assert len(got) == len(want) == 3
    assert max(abs(a - b) for a, b in zip(got, want)) < 1e-5


@pytest.mark.multiprocess
def test_each_process_loads_only_its_rows():
    """tests/mp_rows.py: the pipeline hands each process B/2 rows; stitched, they are the
    one-process batch."""
    run = _launch([sys.executable, "tests/mp_rows.py"], _env(), timeout=120)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    for i in (0, 1):
        assert f"[{i}] process {i} loaded [4] of 8 rows per batch" in run.stdout, run.stdout
