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
"""
from __future__ import annotations

import os

import jax

from jaxcourse.errors import UserError

_started = False


def _auto_detected_cluster() -> bool:
    env = os.environ
    return (env.get("JAXCOURSE_DISTRIBUTED", "") == "auto"
            or int(env.get("SLURM_NTASKS", "1")) > 1
            or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1)


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
    # CPU "hosts" talk through gloo; GPUs and TPUs bring their own collectives (this flag
    # only concerns the CPU backend, so it is harmless there).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**found)
    _started = True
    return True


def is_main_process() -> bool:
    """Process 0 writes summaries, plots and logs; all processes write checkpoints."""
    return jax.process_index() == 0
