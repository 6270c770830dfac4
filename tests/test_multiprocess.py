"""Two processes x 2 CPU devices (gloo collectives, via tpu_gpu_launch/local.py) train the
smoke GPT to the same losses as one process with 4 devices, each process loading only its
own half of every batch; when one process dies, the other one ends within seconds (the
launcher's SIGKILL, or jax's heartbeat timeout without one)."""
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import pytest

from jaxcourse import ch9

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tpu_gpu_launch"))
import local  # noqa: E402

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


# Both processes loop over a cross-process all-gather (a gloo collective) and print a line
# per round; once a peer is gone the survivor waits in the collective for good.
COLLECTIVE_LOOP = """
import os
from jaxcourse.parallel import distributed
distributed.initialize()
import jax.numpy as jnp
from jax.experimental import multihost_utils
for step in range(10**9):
    multihost_utils.process_allgather(jnp.float32(step))
    print(f"step {step} pid {os.getpid()}", flush=True)
"""


def _wait_for_lines(proc, needles: list[str], limit: float = 120) -> str:
    """Reads proc.stdout until every needle has appeared; returns what was read."""
    seen, deadline = "", time.monotonic() + limit
    while not all(n in seen for n in needles):
        line = proc.stdout.readline()
        assert line and time.monotonic() < deadline, f"never saw {needles}:\n{seen[-3000:]}"
        seen += line
    return seen


def _wait_for_file(path: pathlib.Path, needle: str, limit: float = 120) -> None:
    deadline = time.monotonic() + limit
    while needle not in (path.read_text() if path.exists() else ""):
        assert time.monotonic() < deadline, f"never saw {needle!r} in {path}"
        time.sleep(0.1)


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return pathlib.Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"


@pytest.mark.multiprocess
def test_killed_peer_ends_the_survivor_within_10s():
    """The launcher stops a survivor that swallows SIGTERM: it SIGKILLs it after --grace."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAXCOURSE_HEARTBEAT_TIMEOUT"] = "100"  # the launcher alone has to end it.
    launcher = subprocess.Popen(
        [sys.executable, "tpu_gpu_launch/local.py", "--processes", "2", "--platform", "cpu",
         "--timeout", "200", "--", sys.executable, "-c", COLLECTIVE_LOOP],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        seen = _wait_for_lines(launcher, ["[0] step 2 ", "[1] step 2 "])
        pids = {int(m[0]): int(m[1]) for m in re.findall(r"\[(\d)\] step \d+ pid (\d+)", seen)}
        os.kill(pids[1], signal.SIGKILL)
        start = time.monotonic()
        rest, _ = launcher.communicate(timeout=60)
        elapsed = time.monotonic() - start
        print(f"survivor ended {elapsed:.2f} s after the kill")
    finally:
        launcher.kill()
    assert launcher.returncode == 137, seen[-2000:] + rest[-2000:]  # 128 + SIGKILL
    assert "local.py: process 1 failed (exit 137); stopping the others" in rest
    assert _gone(pids[0])
    assert elapsed < 10, f"the survivor ran {elapsed:.1f} s after its peer was killed"


@pytest.mark.multiprocess
@pytest.mark.parametrize("victim", [0, 1])
def test_heartbeat_timeout_ends_the_survivor_without_a_launcher(victim, tmp_path):
    """No launcher watching (another host, a bare srun): jax's coordination service ends the
    survivor once the dead process misses JAXCOURSE_HEARTBEAT_TIMEOUT seconds of heartbeats.
    Process 0 hosts the service, so both directions are checked."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{local.free_port()}",
               JAX_NUM_PROCESSES="2", JAXCOURSE_HEARTBEAT_TIMEOUT="5",
               XLA_FLAGS="--xla_force_host_platform_device_count=1")
    logs = [tmp_path / f"{i}.log" for i in range(2)]
    procs = []
    for i, log in enumerate(logs):
        with open(log, "w") as out:
            procs.append(subprocess.Popen(
                [sys.executable, "-c", COLLECTIVE_LOOP], cwd=REPO, stdout=out,
                stderr=subprocess.STDOUT, env={**env, "JAX_PROCESS_ID": str(i)}))
    try:
        for log in logs:
            _wait_for_file(log, "step 2 ")
        procs[victim].kill()
        start = time.monotonic()
        survivor = procs[1 - victim]
        survivor.wait(timeout=60)
        elapsed = time.monotonic() - start
        print(f"survivor ended {elapsed:.2f} s after the kill")
    finally:
        for p in procs:
            p.kill()
            p.wait()
    tail = logs[1 - victim].read_text()[-2000:]
    assert survivor.returncode != 0, tail
    assert elapsed < 10, f"the survivor ran {elapsed:.1f} s after its peer was killed:\n{tail}"


@pytest.mark.multiprocess
def test_each_process_loads_only_its_rows():
    """tests/mp_rows.py: the pipeline hands each process B/2 rows; stitched, they are the
    one-process batch."""
    run = _launch([sys.executable, "tests/mp_rows.py"], _env(), timeout=120)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    for i in (0, 1):
        assert f"[{i}] process {i} loaded [4] of 8 rows per batch" in run.stdout, run.stdout
