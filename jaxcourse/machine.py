"""Defaults that use the machine, set by the CLI after parsing and before jax starts a backend.

* CPU cores as devices: XLA runs one CPU device by default, so a preset with a data mesh
  (an axis of -1, e.g. chapter 4's `mesh.data=-1`) would train on one core's worth of
  parallelism. The CLI splits the cores into as many XLA CPU devices as the mesh and the
  batch divide into. A device count the user set (`XLA_FLAGS=--xla_force_host_platform_device_count`,
  `JAX_NUM_CPU_DEVICES`) wins, and so does a multi-process launch.
* Persistent compilation cache: a second run of the same program loads its executables
  instead of compiling them. Directory: `$JAXCOURSE_CACHE`, else ~/.cache/jaxcourse/xla;
  `JAXCOURSE_CACHE=off` or `--no-cache` turns it off. A cache directory the user gave jax
  itself (`JAX_COMPILATION_CACHE_DIR`) wins.
"""
from __future__ import annotations

import math
import os
import pathlib

import jax

from jaxcourse.errors import UserError
from jaxcourse.parallel import distributed
from jaxcourse.parallel.mesh import AXES, BATCH_AXES, mesh_shape

CACHE_ENV = "JAXCOURSE_CACHE"
_OFF = ("off", "0", "false", "no")


def cores() -> int:
    """CPU cores this process may run on (the affinity mask, as under taskset or a cgroup)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def cpu_device_count(cfg, num_cores: int) -> int:
    """The most CPU devices, up to `num_cores`, that the config's mesh and batch divide into;
    1 when the config has no mesh that grows with the device count."""
    section = cfg.get("mesh")
    if section is None or -1 not in [section.get(a, 1) for a in AXES]:
        return 1
    if section.get("devices", 0):  # the preset names its device count.
        return int(section.devices)
    batch = cfg.train.batch_size // max(cfg.train.grad_accum, 1)
    for n in range(num_cores, 1, -1):
        try:
            shape = mesh_shape(section, n)
        except UserError:
            continue
        if batch % math.prod(shape[a] for a in BATCH_AXES) == 0:
            return n
    return 1


def use_cpu_cores(cfg) -> None:
    """Sets jax_num_cpu_devices from the config unless the user or a launcher chose a count."""
    if ("xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", "")
            or jax.config.jax_num_cpu_devices >= 0 or distributed.settings() is not None):
        return
    n = cpu_device_count(cfg, cores())
    if n > 1:
        try:
            jax.config.update("jax_num_cpu_devices", n)
        except RuntimeError:  # a backend is already running (jax used in-process before).
            pass


def compilation_cache(enabled: bool = True) -> pathlib.Path | None:
    """Turns jax's persistent compilation cache on; returns its directory (None: off)."""
    if jax.config.jax_compilation_cache_dir:
        return pathlib.Path(jax.config.jax_compilation_cache_dir)
    value = os.environ.get(CACHE_ENV, "")
    if not enabled or value.lower() in _OFF:
        return None
    path = pathlib.Path(value).expanduser() if value else (
        pathlib.Path.home() / ".cache" / "jaxcourse" / "xla")
    jax.config.update("jax_compilation_cache_dir", str(path))
    # jax caches only compiles over 1 s by default; a run's many small jits add up too.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return path
