"""Start N copies of a command on this machine as one multi-process jax job.

    python tpu_gpu_launch/local.py --processes 2 --devices-per-process 2 -- \
        python -m jaxcourse.ch9 --config=configs/ch9_layouts.py:smoke

Each copy gets JAX_COORDINATOR_ADDRESS (a free port on 127.0.0.1: nothing listens beyond
this machine), JAX_NUM_PROCESSES and JAX_PROCESS_ID; the program calls
`jaxcourse.parallel.distributed.initialize()`, which hands them to jax.distributed.
  --platform cpu  (default without GPUs) each process simulates --devices-per-process CPU
                  devices and collectives go through gloo: two processes stand in for two
                  hosts, which is how the tests exercise multi-host code.
  --platform gpu  process i sees GPUs i*D .. i*D+D-1 (CUDA_VISIBLE_DEVICES): single-node
                  multi-GPU with one process per GPU group.
Output lines are prefixed with the process id. Each process leads its own process group.
When one process fails, --timeout passes, or the launcher gets SIGINT / SIGTERM, the others
get SIGTERM and, --grace seconds later, SIGKILL for their whole group: a survivor waiting in
a collective for a dead peer does not end on SIGTERM (jax's preemption service catches it).
The exit code is the first failure's (128 + N for a process killed by signal N). On Linux a
process also gets SIGKILL if the launcher itself dies.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(base: dict, process_id: int, args) -> dict:
    env = dict(base)
    env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{args.port}",
               JAX_NUM_PROCESSES=str(args.processes), JAX_PROCESS_ID=str(process_id))
    d = args.devices_per_process
    if args.platform == "cpu":
        flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "",
                       env.get("XLA_FLAGS", "")).strip()
        env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={d}".strip()
        env["JAX_PLATFORMS"] = "cpu"
    else:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(process_id * d + k) for k in range(d))
    return env


def exit_code(returncode: int) -> int:
    """A child's return code as a shell reports it (killed by signal N: 128 + N)."""
    return 128 - returncode if returncode < 0 else returncode


def _pump(stream, prefix: str, out) -> None:
    for line in iter(stream.readline, ""):
        out.write(f"{prefix}{line}")
        out.flush()


def parse(argv):
    parser = argparse.ArgumentParser(
        description="Run a command as N local jax processes (a stand-in for N hosts).",
        usage="local.py [--processes N] [--devices-per-process D] [--platform cpu|gpu] "
              "[--timeout S] [--grace S] -- COMMAND ...")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--devices-per-process", type=int, default=1)
    parser.add_argument("--platform", choices=("cpu", "gpu"),
                        default="gpu" if shutil.which("nvidia-smi") else "cpu")
    parser.add_argument("--port", type=int, default=0, help="coordinator port (0: a free one)")
    parser.add_argument("--timeout", type=float, default=0, help="seconds; 0: no limit")
    parser.add_argument("--grace", type=float, default=3.0,
                        help="seconds between SIGTERM and SIGKILL when stopping processes")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if args.command[:1] == ["--"]:
        args.command = args.command[1:]
    if not args.command:
        parser.error("no command given after --")
    if args.processes < 1 or args.devices_per_process < 1:
        parser.error("--processes and --devices-per-process must be >= 1")
    if args.grace < 0:
        parser.error("--grace must be >= 0")
    args.port = args.port or free_port()
    return args


def _die_with_launcher():
    """preexec_fn: on Linux the kernel SIGKILLs the process if the launcher dies (even by
    SIGKILL, when it cannot stop anyone itself). Elsewhere a no-op."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before fork, called after.
    parent = os.getpid()

    def preexec():
        prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the launcher died before prctl took effect.
            os._exit(1)
    return preexec


def _signal_groups(procs, sig) -> None:
    for p in procs:
        try:
            os.killpg(p.pid, sig)  # the whole group: also what the command started itself.
        except ProcessLookupError:
            pass


def stop(procs, grace: float) -> None:
    """SIGTERM to every process group, then SIGKILL to all of them after `grace` seconds
    (at once for groups whose leader has already exited)."""
    _signal_groups([p for p in procs if p.poll() is None], signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(p.poll() is None for p in procs):
        time.sleep(0.05)
    _signal_groups(procs, signal.SIGKILL)
    for p in procs:
        p.wait()


def run(argv=None) -> int:
    args = parse(argv)
    received = []  # a signal to the launcher stops the job like a failed process does.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: received.append(signum))
    procs, pumps, preexec = [], [], _die_with_launcher()
    for i in range(args.processes):
        # start_new_session: a group per process, so a stop reaches its children too.
        p = subprocess.Popen(args.command, env=child_env(os.environ, i, args), text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             start_new_session=True, preexec_fn=preexec)
        t = threading.Thread(target=_pump, args=(p.stdout, f"[{i}] ", sys.stdout), daemon=True)
        t.start()
        procs.append(p)
        pumps.append(t)
    deadline = time.monotonic() + args.timeout if args.timeout else None
    code = 0
    while [p.poll() for p in procs].count(None):  # poll() every process (no short cut).
        failed = [(i, p.returncode) for i, p in enumerate(procs)
                  if p.returncode not in (None, 0)]
        late = deadline is not None and time.monotonic() > deadline
        if failed or late or received:
            if failed:
                code = exit_code(failed[0][1])
                why = f"process {failed[0][0]} failed (exit {code})"
            elif late:
                code, why = 124, f"--timeout {args.timeout:g} s passed"
            else:
                code = 128 + received[0]
                why = f"got {signal.Signals(received[0]).name}"
            print(f"local.py: {why}; stopping the others (SIGTERM, SIGKILL after "
                  f"{args.grace:g} s)", file=sys.stderr, flush=True)
            break
        time.sleep(0.1)
    stop(procs, args.grace)  # also after a clean end: no process group outlives the launcher.
    for t in pumps:
        t.join(timeout=5)
    if code == 0:
        code = next((exit_code(p.returncode) for p in procs if p.returncode), 0)
    if code:
        print(f"local.py: a process failed (exit {code})", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(run())
