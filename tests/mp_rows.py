"""Run by tests/test_multiprocess.py under tpu_gpu_launch/local.py: each process draws only
its own rows of every batch, and the stitched global batch equals the one-process batch."""
import numpy as np

from jaxcourse.parallel import distributed

distributed.initialize()

import jax  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from jaxcourse.data import pipeline  # noqa: E402
from jaxcourse.parallel.batch import put_global  # noqa: E402
from jaxcourse.parallel.mesh import make_mesh, mesh_config  # noqa: E402

B = 8
mesh = make_mesh(mesh_config(data=-1))
tokens, arrays = np.arange(5000), {"x": np.arange(100) * 3}
datasets = [  # (this process's rows, the whole batch)
    (pipeline.lm_batches(tokens, B, 16, 0), pipeline.lm_batches(tokens, B, 16, 0, pipeline.ALL_ROWS)),
    (pipeline.batches(arrays, B, 0), pipeline.batches(arrays, B, 0, pipeline.ALL_ROWS)),
]
rows = set()
for mine, whole in datasets:
    for step in (0, 1, 7):
        local = mine[step]
        rows |= {len(v) for v in local.values()}
        stacked = {k: v[None] for k, v in local.items()}  # [K=1, B/n, ...] as the loop stacks
        glob = put_global(stacked, mesh, leading=1, global_rows=B)
        for k, v in glob.items():
            got = multihost_utils.process_allgather(v, tiled=True)[0]
            np.testing.assert_array_equal(got, whole[step][k])
print(f"process {jax.process_index()} loaded {sorted(rows)} of {B} rows per batch")
