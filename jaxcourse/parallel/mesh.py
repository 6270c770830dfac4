"""The one device mesh of the project: five named axes built from the config's `mesh` section.

Every layout of chapter 9 is a choice of axis sizes on the same five axes; an axis of size 1
costs nothing, so data parallel, FSDP, tensor, pipeline and expert parallelism (and their
mixtures) are all the same code with different numbers. The axis order puts the axis with the
most traffic (tensor) innermost, so on a real machine its devices are neighbours, and the one
with the least traffic (data, a gradient all-reduce once per step) outermost, where it can span
hosts.

All axes are `AxisType.Auto`: GSPMD propagates the shardings we give the parameters and the
batch. (`jax.make_mesh` defaults to Explicit axis types, which need sharding-in-types code.)
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
import ml_collections
from jax.sharding import AxisType, Mesh

from jaxcourse.errors import UserError

# Outermost to innermost.
AXES = ("data", "pipeline", "fsdp", "expert", "tensor")
# The mesh axes the global batch is split over, in this order (expert parallelism also takes
# a share of the batch: each expert group routes its own tokens).
BATCH_AXES = ("data", "fsdp", "expert")

# Named layouts for 8 devices, as used by chapter 9 and its tests. -1 = the rest of the devices.
LAYOUTS: dict[str, dict[str, int]] = {
    "single": {"data": 1},
    "dp": {"data": -1},
    "fsdp": {"fsdp": -1},
    "tp": {"tensor": 4, "data": -1},
    "fsdp_tp": {"fsdp": 4, "tensor": 2},
    "pp": {"pipeline": 4, "data": -1},
}


def mesh_config(rules: str = "gpt", devices: int = 0, **sizes: int) -> ml_collections.ConfigDict:
    """The config section `mesh`: every axis (unnamed ones get size 1, -1 = the rest of
    the devices), the name of the logical-axis rule table (see rules.RULES), and how many
    devices to use (0 = all of them; N = the first N, for comparisons on one machine)."""
    unknown = sorted(set(sizes) - set(AXES))
    if unknown:
        raise UserError(f"unknown mesh axis {unknown[0]!r}; the axes are {', '.join(AXES)}")
    return ml_collections.ConfigDict({**{a: int(sizes.get(a, 1)) for a in AXES},
                                      "rules": rules, "devices": int(devices)})


def layout_config(name: str) -> ml_collections.ConfigDict:
    """`mesh` section for one of the named LAYOUTS."""
    if name not in LAYOUTS:
        raise UserError(f"unknown layout {name!r}; choose one of {', '.join(LAYOUTS)}")
    return mesh_config(**LAYOUTS[name])


def mesh_shape(sizes: Mapping[str, int], num_devices: int) -> dict[str, int]:
    """Resolves -1 and checks that the axis sizes multiply to exactly `num_devices`.

    Raises UserError (before anything is compiled) when they cannot.
    """
    shape = {a: int(sizes.get(a, 1)) for a in AXES}
    unknown = sorted(set(sizes) - set(AXES) - {"rules", "devices"})
    if unknown:
        raise UserError(f"unknown mesh axis {unknown[0]!r}; the axes are {', '.join(AXES)}")
    rest = [a for a, n in shape.items() if n == -1]
    bad = [a for a, n in shape.items() if n == 0 or n < -1]
    if bad:
        raise UserError(f"mesh.{bad[0]}={shape[bad[0]]}: axis sizes must be positive or -1")
    if len(rest) > 1:
        raise UserError(f"mesh: only one axis may be -1, got {', '.join(rest)}")
    fixed = math.prod(n for n in shape.values() if n != -1)
    desc = " x ".join(f"{a}={n}" for a, n in shape.items() if n != 1)
    if rest:
        if num_devices % fixed:
            raise UserError(f"mesh {desc}: the fixed axes ({fixed} devices) do not divide "
                            f"the {num_devices} devices")
        shape[rest[0]] = num_devices // fixed
    elif fixed != num_devices:
        raise UserError(f"mesh {desc or 'of size 1'} needs {fixed} devices but "
                        f"{num_devices} are available")
    return shape


def make_mesh(sizes: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The project mesh: all five axes, explicit Auto axis types.

    Devices: the given ones, else the first `sizes["devices"]` (0 or absent: all).
    """
    if devices is None:
        devices = select_devices(int(sizes.get("devices", 0)))
    devices = list(devices)
    shape = mesh_shape(sizes, len(devices))
    return jax.make_mesh(tuple(shape[a] for a in AXES), AXES,
                         axis_types=(AxisType.Auto,) * len(AXES), devices=devices)


def select_devices(n: int) -> list[jax.Device]:
    """The first n devices (0: all). With several processes every device must take part."""
    available = jax.devices()
    if n == 0:
        return available
    if not 0 < n <= len(available):
        raise UserError(f"mesh.devices={n}: there are {len(available)} devices")
    if n < len(available) and jax.process_count() > 1:
        raise UserError(f"mesh.devices={n}: a multi-process run uses all {len(available)} devices")
    return available[:n]


def batch_shards(mesh: Mesh) -> int:
    """How many ways the global batch is split (product of the BATCH_AXES sizes)."""
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def check_batch(batch_size: int, mesh: Mesh, microbatches: int = 1) -> None:
    """A clear error, before any compile, when the batch does not split over the mesh."""
    shards = batch_shards(mesh)
    if batch_size % (shards * microbatches):
        parts = " x ".join(f"{a}={mesh.shape[a]}" for a in BATCH_AXES if mesh.shape[a] > 1)
        extra = f" x {microbatches} microbatches" if microbatches > 1 else ""
        raise UserError(f"batch_size={batch_size} is not divisible by {parts or 'data=1'}{extra} "
                        f"(= {shards * microbatches})")


def describe(mesh: Mesh) -> str:
    """Short label such as 'data=2 x tensor=4' (axes of size 1 left out)."""
    parts = [f"{a}={n}" for a, n in mesh.shape.items() if n > 1]
    return " x ".join(parts) or "single device"
