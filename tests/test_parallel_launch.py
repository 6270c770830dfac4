"""Multi-process plumbing without jax: the launcher's environments, exit codes, env parsing."""
import os
import pathlib
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from jaxcourse.errors import UserError
from jaxcourse.parallel import distributed

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tpu_gpu_launch"))
import local  # noqa: E402


def test_child_env_per_platform():
    args = SimpleNamespace(port=1234, processes=2, devices_per_process=3, platform="cpu")
    env = local.child_env({"XLA_FLAGS": "--foo --xla_force_host_platform_device_count=8"}, 1, args)
    assert env["JAX_COORDINATOR_ADDRESS"] == "127.0.0.1:1234"
    assert (env["JAX_NUM_PROCESSES"], env["JAX_PROCESS_ID"]) == ("2", "1")
    assert env["XLA_FLAGS"] == "--foo --xla_force_host_platform_device_count=3"
    args.platform = "gpu"
    assert local.child_env({}, 1, args)["CUDA_VISIBLE_DEVICES"] == "3,4,5"


def test_launcher_stops_everyone_when_one_process_fails():
    script = ("import os, sys, time\n"
              "if os.environ['JAX_PROCESS_ID'] == '1': sys.exit(3)\n"
              "time.sleep(60)\n")
    start = time.monotonic()
    done = subprocess.run([sys.executable, str(REPO / "tpu_gpu_launch" / "local.py"),
                           "--processes", "2", "--", sys.executable, "-c", script],
                          capture_output=True, text=True, timeout=50)
    assert done.returncode == 3
    assert "a process failed (exit 3)" in done.stderr
    assert time.monotonic() - start < 30  # process 0 was stopped, not waited for


def test_distributed_settings_from_environment(monkeypatch):
    for key in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "JAX_COORDINATOR_ADDRESS",
                "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "JAXCOURSE_DISTRIBUTED"):
        monkeypatch.delenv(key, raising=False)
    assert distributed.settings() is None  # a plain single-process run
    monkeypatch.setenv("SLURM_NTASKS", "16")
    assert distributed.settings() == {}  # jax reads SLURM's variables itself
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAX_PROCESS_ID", "1")
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:999")
    assert distributed.settings() == {"coordinator_address": "127.0.0.1:999",
                                      "num_processes": 2, "process_id": 1}
    monkeypatch.setenv("JAX_PROCESS_ID", "2")
    with pytest.raises(UserError, match=r"JAX_PROCESS_ID=2 is not in \[0, JAX_NUM_PROCESSES=2\)"):
        distributed.settings()
    assert os.environ.get("JAX_PROCESS_ID") == "2"


def test_launcher_sigkills_a_group_that_ignores_sigterm():
    """Process 0 ignores SIGTERM (as jax does while it waits in a collective) and has a child
    of its own: --grace seconds after process 1 fails, SIGKILL ends both."""
    script = ("import os, signal, subprocess, sys, time\n"
              "if os.environ['JAX_PROCESS_ID'] == '1':\n"
              "    time.sleep(1); sys.exit(5)\n"
              "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
              "child = subprocess.Popen(['sleep', '60'])\n"
              "print('child', child.pid, flush=True)\n"
              "time.sleep(60)\n")
    start = time.monotonic()
    done = subprocess.run([sys.executable, str(REPO / "tpu_gpu_launch" / "local.py"),
                           "--processes", "2", "--grace", "1", "--", sys.executable, "-c", script],
                          capture_output=True, text=True, timeout=50)
    elapsed = time.monotonic() - start
    assert done.returncode == 5, done.stdout + done.stderr
    assert "process 1 failed (exit 5); stopping the others (SIGTERM, SIGKILL after 1 s)" in done.stderr
    grandchild = int(done.stdout.split("[0] child ")[1].split()[0])
    assert _ends_soon(grandchild)  # the whole group went, not just its leader
    assert elapsed < 10


def test_exit_codes_as_a_shell_reports_them():
    assert [local.exit_code(c) for c in (0, 3, -9, -15)] == [0, 3, 137, 143]


def _ends_soon(pid: int, limit: float = 2.0) -> bool:
    """True once `pid` is gone or a zombie (killed, waiting for init to reap it)."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            if pathlib.Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z":
                return True
        except (FileNotFoundError, ProcessLookupError):
            return True
        time.sleep(0.05)
    return False


def test_distributed_timeouts_from_environment(monkeypatch):
    monkeypatch.delenv("JAXCOURSE_HEARTBEAT_TIMEOUT", raising=False)
    assert distributed.timeouts()["heartbeat_timeout_seconds"] == distributed.HEARTBEAT_TIMEOUT
    monkeypatch.setenv("JAXCOURSE_SHUTDOWN_TIMEOUT", "7")
    assert distributed.timeouts()["shutdown_timeout_seconds"] == 7
    monkeypatch.setenv("JAXCOURSE_HEARTBEAT_TIMEOUT", "0")
    with pytest.raises(UserError, match="JAXCOURSE_HEARTBEAT_TIMEOUT='0' must be a whole number"):
        distributed.timeouts()


def test_launcher_passes_its_sigterm_on_and_exits_143():
    script = ("import os, time\n"
              "print('up', os.getpid(), flush=True)\n"
              "time.sleep(60)\n")
    launcher = subprocess.Popen([sys.executable, str(REPO / "tpu_gpu_launch" / "local.py"),
                                 "--processes", "2", "--", sys.executable, "-c", script],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pids = [int(launcher.stdout.readline().split()[-1]) for _ in range(2)]
    launcher.send_signal(signal.SIGTERM)
    out, err = launcher.communicate(timeout=20)
    assert launcher.returncode == 143, err
    assert "got SIGTERM; stopping the others" in err
    assert all(_ends_soon(pid) for pid in pids)


def test_processes_die_with_a_sigkilled_launcher():
    script = ("import os, time\n"
              "print('up', os.getpid(), flush=True)\n"
              "time.sleep(60)\n")
    launcher = subprocess.Popen([sys.executable, str(REPO / "tpu_gpu_launch" / "local.py"),
                                 "--processes", "2", "--", sys.executable, "-c", script],
                                stdout=subprocess.PIPE, text=True)
    pids = [int(launcher.stdout.readline().split()[-1]) for _ in range(2)]
    launcher.kill()  # it cannot stop anyone itself; the kernel does (PR_SET_PDEATHSIG).
    launcher.wait()
    assert all(_ends_soon(pid) for pid in pids)
