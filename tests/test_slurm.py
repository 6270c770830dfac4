"""tpu_gpu_launch/slurm.sbatch under a real (one-node) SLURM: 2 tasks x 2 CPU devices with gloo.

Needs a running cluster: `tpu_gpu_launch/slurm_local_cluster.sh` starts one (root, apt);
.ci/run does that and then runs `pytest -m slurm` with JAXCOURSE_REQUIRE_SLURM=1, where a
missing cluster fails instead of skipping.
"""
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.slurm

REPO = pathlib.Path(__file__).resolve().parents[1]
CH9 = [sys.executable, "-m", "jaxcourse.ch9", "--config=configs/ch9_train.py:smoke"]
# The script's defaults are for GPU nodes; a task here is one CPU with 2 simulated devices.
SBATCH = ["sbatch", "--parsable", "--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0",
          "--cpus-per-task=1", "--time=10"]


def _cluster_problem() -> str | None:
    if shutil.which("sbatch") is None:
        return "sbatch is not on PATH (tpu_gpu_launch/slurm_local_cluster.sh starts a cluster)"
    try:
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=20)
        if ping.returncode:  # answers at once; sinfo retries for seconds first.
            return f"no slurmctld answers: {ping.stdout.splitlines()[0] if ping.stdout else ''}"
        done = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True,
                              timeout=20)
    except subprocess.TimeoutExpired:
        return "scontrol / sinfo did not answer within 20 s"
    if done.returncode or not re.search(r"idle|mixed|allocated", done.stdout):
        return f"no SLURM node up (sinfo: {(done.stdout + done.stderr).strip()[:200]})"
    return None


@pytest.fixture(scope="module")
def slurm_env():
    problem = _cluster_problem()
    if problem:
        if os.environ.get("JAXCOURSE_REQUIRE_SLURM") == "1":
            pytest.fail(problem)
        pytest.skip(problem)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
               PYTHONPATH=str(REPO), JAXCOURSE_CACHE="off")
    return env  # sbatch exports the submitting environment to every task.


def _sbatch(env, out: pathlib.Path, command: list[str]) -> str:
    """Submits slurm.sbatch COMMAND; returns the job id."""
    done = subprocess.run([*SBATCH, f"--output={out}", "tpu_gpu_launch/slurm.sbatch", *command],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    job = done.stdout.strip().split(";")[0]
    assert done.returncode == 0 and job.isdigit(), done.stdout + done.stderr
    return job


def _wait(job: str, limit: float = 300) -> str:
    """The job's final state. (Polls: `sbatch --wait` notices the end up to 30 s late.)"""
    deadline = time.monotonic() + limit
    while (state := _job_state(job)) in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING"):
        if time.monotonic() > deadline:
            subprocess.run(["scancel", job])
            raise AssertionError(f"job {job} still {state} after {limit} s")
        time.sleep(0.2)
    return state


def _losses(workdir: pathlib.Path) -> list[float]:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [r["train/loss"] for r in rows if "train/loss" in r]


def _job_state(job: str) -> str:
    shown = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True,
                           text=True).stdout
    found = re.search(r"JobState=(\S+)", shown)
    return found[1] if found else "GONE"


def _task_pids(job: str) -> dict[int, int]:
    """SLURM_PROCID -> pid of the python processes this job's tasks run."""
    pids = {}
    for proc in pathlib.Path("/proc").glob("[0-9]*"):
        try:
            env = dict(kv.split("=", 1) for kv in
                       (proc / "environ").read_text().split("\0") if "=" in kv)
            cmdline = (proc / "cmdline").read_text()
        except OSError:
            continue
        if env.get("SLURM_JOB_ID") == job and "jaxcourse.ch9" in cmdline:
            pids[int(env["SLURM_PROCID"])] = int(proc.name)
    return pids


def test_two_tasks_train_like_two_local_processes(slurm_env, tmp_path):
    args = ["--config.train.batch_size=16", "--config.train.steps=3"]
    job = _sbatch(slurm_env, tmp_path / "slurm.out",
                  [*CH9, *args, f"--workdir={tmp_path / 'slurm'}"])
    state = _wait(job)
    log = (tmp_path / "slurm.out").read_text()
    assert state == "COMPLETED", log[-3000:]
    assert "0: jaxcourse.ch9: 4 cpu devices" in log  # srun --label: task 0 sees 2 x 2 devices
    assert "1: jaxcourse.ch9: process 1 finished" in log
    local = subprocess.run(
        [sys.executable, "tpu_gpu_launch/local.py", "--processes", "2",
         "--devices-per-process", "2", "--platform", "cpu", "--timeout", "240", "--",
         *CH9, *args, f"--workdir={tmp_path / 'local'}"],
        cwd=REPO, env=slurm_env, capture_output=True, text=True, timeout=300)
    assert local.returncode == 0, local.stdout[-3000:] + local.stderr[-3000:]
    got, want = _losses(tmp_path / "slurm"), _losses(tmp_path / "local")
    print(f"slurm losses {got}, local.py losses {want}")
    assert len(got) == len(want) == 3
    assert got == want  # same processes, devices and mesh: bitwise the same numbers


def test_killing_one_task_ends_the_job_within_seconds(slurm_env, tmp_path):
    workdir = tmp_path / "long"
    job = _sbatch(slurm_env, tmp_path / "slurm.out",
                  [*CH9, "--config.train.steps=100000", f"--workdir={workdir}"])
    try:
        deadline = time.monotonic() + 180
        while not ((workdir / "metrics.jsonl").exists()
                   and (workdir / "metrics.jsonl").read_text().count("train/loss") >= 2):
            assert _job_state(job) in ("PENDING", "RUNNING"), (tmp_path / "slurm.out").read_text()
            assert time.monotonic() < deadline, "the job never started training"
            time.sleep(0.5)
        pids = _task_pids(job)
        assert sorted(pids) == [0, 1], pids
        os.kill(pids[1], signal.SIGKILL)
        start = time.monotonic()
        while _job_state(job) in ("RUNNING", "COMPLETING") or any(
                pathlib.Path(f"/proc/{p}").exists() for p in pids.values()):
            assert time.monotonic() - start < 60, "the job still runs 60 s after the kill"
            time.sleep(0.1)
        elapsed = time.monotonic() - start
        print(f"job ended {elapsed:.2f} s after the kill")
    finally:
        subprocess.run(["scancel", job])
    log = (tmp_path / "slurm.out").read_text()
    assert _job_state(job) == "FAILED", log[-3000:]
    assert elapsed < 10, f"job ended {elapsed:.1f} s after its task 1 was killed:\n{log[-2000:]}"


def test_indivisible_batch_fails_with_one_line_before_training(slurm_env, tmp_path):
    workdir = tmp_path / "bad"
    job = _sbatch(slurm_env, tmp_path / "slurm.out",
                  [*CH9, "--config.train.batch_size=6", f"--workdir={workdir}"])
    state = _wait(job, limit=120)
    log = (tmp_path / "slurm.out").read_text()
    assert state == "FAILED", log[-3000:]
    errors = [line for line in log.splitlines() if "jaxcourse.ch9: error" in line]
    want = "jaxcourse.ch9: error: batch_size=6 is not divisible by data=4 (= 4)"
    assert errors and all(line.endswith(want) for line in errors), log[-3000:]
    assert "Traceback" not in log, log[-3000:]
    assert not (workdir / "metrics.jsonl").exists()  # no task took a training step
