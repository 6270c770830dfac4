"""Global batches built from each process's local rows.

On a multi-host run every process holds only the devices of its host, so it loads only the
rows of the global batch that land on those devices and hands them to
`jax.make_array_from_process_local_data`, which stitches one global array out of all the
processes' pieces without any process ever holding the whole batch.
"""
from __future__ import annotations

from collections.abc import Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxcourse.errors import UserError
from jaxcourse.parallel.mesh import BATCH_AXES, batch_shards


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over the batch axes; the rest replicated."""
    live = tuple(a for a in BATCH_AXES if mesh.shape[a] > 1)
    return NamedSharding(mesh, P(live or None))


def process_rows(global_batch_size: int, mesh: Mesh) -> slice:
    """The rows of the global batch that this process's devices hold.

    They are contiguous because the data-like axes are the outer mesh axes and the mesh lists
    each process's devices together.
    """
    if global_batch_size % batch_shards(mesh):
        raise UserError(f"batch of {global_batch_size} rows cannot be split over "
                        f"{batch_shards(mesh)} batch shards")
    index_map = batch_sharding(mesh).addressable_devices_indices_map((global_batch_size,))
    rows = {(idx[0].start or 0, idx[0].stop or global_batch_size) for idx in index_map.values()}
    lo, hi = min(a for a, _ in rows), max(b for _, b in rows)
    if sum(b - a for a, b in rows) != hi - lo:
        raise UserError("this process's batch rows are not contiguous; reorder the mesh devices")
    return slice(lo, hi)


def shard_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Global arrays from this process's rows (all rows when there is one process)."""
    sharding = batch_sharding(mesh)
    n_proc = jax.process_count()
    out = {}
    for key, local in local_batch.items():
        local = np.asarray(local)
        global_shape = (local.shape[0] * n_proc,) + local.shape[1:]
        out[key] = jax.make_array_from_process_local_data(sharding, local, global_shape)
    return out


def local_part(global_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, np.ndarray]:
    """This process's rows of a batch that every process can produce (same seed everywhere)."""
    out = {}
    for key, value in global_batch.items():
        out[key] = np.asarray(value)[process_rows(len(value), mesh)]
    return out
