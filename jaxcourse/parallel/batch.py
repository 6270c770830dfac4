"""Global batches built from each process's local rows.

On a multi-host run every process holds only the devices of its host, so it hands over only
the rows of the global batch that land on those devices, and
`jax.make_array_from_process_local_data` stitches one global array out of all the
processes' pieces without any process ever placing the whole batch on a device.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxcourse.errors import UserError
from jaxcourse.parallel.mesh import BATCH_AXES, batch_shards


def batch_sharding(mesh: Mesh, leading: int = 0) -> NamedSharding:
    """Batch dimension (after `leading` unsplit axes, e.g. K stacked steps) over the
    batch axes; everything else replicated."""
    live = tuple(a for a in BATCH_AXES if mesh.shape[a] > 1) or None
    return NamedSharding(mesh, P(*([None] * leading), live))


def process_rows(sharding: NamedSharding, shape: Sequence[int], axis: int = 0) -> slice:
    """The rows along `axis` that this process's devices hold.

    They are contiguous because the batch axes are the outer mesh axes and the mesh lists
    each process's devices together.
    """
    index_map = sharding.addressable_devices_indices_map(tuple(shape))
    n = shape[axis]
    rows = {(idx[axis].start or 0, idx[axis].stop or n) for idx in index_map.values()}
    lo, hi = min(a for a, _ in rows), max(b for _, b in rows)
    if sum(b - a for a, b in rows) != hi - lo:
        raise UserError("this process's batch rows are not contiguous; reorder the mesh devices")
    return slice(lo, hi)


def put_global(batch: Mapping[str, np.ndarray], mesh: Mesh, leading: int = 0,
               global_rows: int = 0) -> dict:
    """Global arrays from numpy batches.

    Each process hands over only its own rows; on one process that is all of them. A batch
    of `global_rows` rows (or any size when `global_rows` is 0) is the whole batch, which
    every process produced alike, and is cut to this process's rows. With several processes
    a batch of `global_rows / process_count` rows is this process's share already, as
    `data.pipeline` makes it (shard i holds rows [i * B/n, (i+1) * B/n)).
    """
    sharding = batch_sharding(mesh, leading)
    n_proc, me = jax.process_count(), jax.process_index()

    def put(x):
        x = np.asarray(x)
        n = x.shape[leading]
        is_share = n_proc > 1 and global_rows and n * n_proc == global_rows
        shape = x.shape[:leading] + (global_rows,) + x.shape[leading + 1:] if is_share else x.shape
        if shape[leading] % batch_shards(mesh):
            raise UserError(f"batch of {shape[leading]} rows cannot be split over the "
                            f"{batch_shards(mesh)} batch shards of the mesh")
        rows = process_rows(sharding, shape, leading)
        if not is_share:
            local = x[(slice(None),) * leading + (rows,)]
        elif (rows.start, rows.stop) == (me * n, (me + 1) * n):
            local = x
        else:
            raise UserError(f"process {me} holds rows {rows.start}:{rows.stop} of the batch on "
                            f"this mesh but loaded rows {me * n}:{(me + 1) * n}; keep the "
                            "tensor and pipeline axes inside one host")
        return jax.make_array_from_process_local_data(sharding, local, shape)

    return {key: put(value) for key, value in batch.items()}


def shard_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Global arrays from rows this process loaded itself (its share of every batch)."""
    sharding = batch_sharding(mesh)
    out = {}
    for key, local in local_batch.items():
        local = np.asarray(local)
        global_shape = (local.shape[0] * jax.process_count(),) + local.shape[1:]
        out[key] = jax.make_array_from_process_local_data(sharding, local, global_shape)
    return out
