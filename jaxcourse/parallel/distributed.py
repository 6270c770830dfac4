"""Multi-process start-up: `jax.distributed.initialize` from the environment.

Call `initialize()` first thing in a program (before any jax computation). It does nothing
in a single-process run, so every chapter can call it unconditionally.

Where the settings come from:
  * tpu_gpu_launch/local.py (and any launcher of your own) sets
      JAX_COORDINATOR_ADDRESS=127.0.0.1:<port>  (read by jax itself)
      JAX_NUM_PROCESSES=<n>  JAX_PROCESS_ID=<i>
  * SLURM and Open MPI: jax auto-detects everything; we only need to know we are in one
    (SLURM_NTASKS > 1, OMPI_COMM_WORLD_SIZE > 1).
  * Cloud TPU pods (tpu_gpu_launch/tpu_pod.sh) and anything else jax can auto-detect:
    JAXCOURSE_DISTRIBUTED=auto.
On CPU the processes exchange collectives through gloo, standing in for NCCL / ICI.

When one process dies the others must not wait for it forever (a collective with a dead
peer never returns). The launchers stop them (local.py: SIGTERM, then SIGKILL; srun:
--kill-on-bad-exit); as a backstop for any launcher, jax's coordination service ends every
process whose peer has sent no heartbeat for JAXCOURSE_HEARTBEAT_TIMEOUT seconds (default
HEARTBEAT_TIMEOUT, jax's own default is 100). The other two limits: how long a process waits
for the others to join at start-up, and at exit.
"""
from __future__ import annotations

import os

import jax

from jaxcourse.errors import UserError

HEARTBEAT_TIMEOUT = 10
INIT_TIMEOUT = 300  # the slowest process may still be importing and loading data.
SHUTDOWN_TIMEOUT = 60  # process 0 writes the summary and plots after the last step.
_TIMEOUTS = {"JAXCOURSE_HEARTBEAT_TIMEOUT": ("heartbeat_timeout_seconds", HEARTBEAT_TIMEOUT),
             "JAXCOURSE_INIT_TIMEOUT": ("initialization_timeout", INIT_TIMEOUT),
             "JAXCOURSE_SHUTDOWN_TIMEOUT": ("shutdown_timeout_seconds", SHUTDOWN_TIMEOUT)}

_started = False


def _auto_detected_cluster() -> bool:
    env = os.environ
    return (env.get("JAXCOURSE_DISTRIBUTED", "") == "auto"
            or int(env.get("SLURM_NTASKS", "1")) > 1
            or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1)


def timeouts() -> dict[str, int]:
    """jax.distributed's heartbeat, start-up and shutdown limits in seconds (env overrides)."""
    out = {}
    for key, (arg, default) in _TIMEOUTS.items():
        value = os.environ.get(key, str(default))
        if not value.isdigit() or int(value) < 1:
            raise UserError(f"{key}={value!r} must be a whole number of seconds >= 1")
        out[arg] = int(value)
    return out


def settings() -> dict | None:
    """The multi-process settings found in the environment, or None for a single process."""
    env = os.environ
    if "JAX_NUM_PROCESSES" in env:
        try:
            n, i = int(env["JAX_NUM_PROCESSES"]), int(env.get("JAX_PROCESS_ID", ""))
        except ValueError:
            raise UserError("JAX_NUM_PROCESSES and JAX_PROCESS_ID must be integers") from None
        if not 0 <= i < n:
            raise UserError(f"JAX_PROCESS_ID={i} is not in [0, JAX_NUM_PROCESSES={n})")
        if "JAX_COORDINATOR_ADDRESS" not in env:
            raise UserError("JAX_NUM_PROCESSES is set but JAX_COORDINATOR_ADDRESS is not")
        return {"coordinator_address": env["JAX_COORDINATOR_ADDRESS"], "num_processes": n,
                "process_id": i}
    if _auto_detected_cluster():
        return {}  # jax reads the SLURM / Open MPI / TPU settings itself.
    return None


def initialize() -> bool:
    """Starts jax.distributed when the environment asks for it; True if it did (or had)."""
    global _started
    if _started:
        return True
    found = settings()
    if found is None:
        return False
    limits = timeouts()
    # CPU "hosts" talk through gloo; GPUs and TPUs bring their own collectives (this flag
    # only concerns the CPU backend, so it is harmless there).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**found, **limits)
    _started = True
    return True


def is_main_process() -> bool:
    """Process 0 writes summaries, plots and logs; all processes write checkpoints."""
    return jax.process_index() == 0
