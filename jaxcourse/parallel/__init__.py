"""One mesh for data / FSDP / tensor / pipeline / expert parallelism, and multi-host start-up.

    mesh = make_mesh(cfg.mesh)                       # five named axes, Auto axis types
    params, shardings = sharded_init(init, GPT_RULES, mesh, rng, batch)
    with use_mesh(mesh, GPT_RULES):                  # activation constraints resolve
        ... jit(step, in_shardings=..., out_shardings=...) ...

mesh.py      axes, sizes from config (-1 = the rest), named layouts, batch checks
rules.py     logical-axis rules per model family -> NamedSharding; sharded init
batch.py     global batches from each process's rows (make_array_from_process_local_data)
plan.py      what the training loop needs to run sharded (state shardings, batches)
pipeline.py  GPipe over the `pipeline` axis (shard_map + ppermute), schedule statistics
expert.py    all_to_all dispatch / combine over the `expert` axis
memory.py    per-device bytes, compiled memory analysis, largest model under a budget
flops.py     FLOPs per token, MFU, measured peak FLOP/s
distributed.py  jax.distributed.initialize from the environment (local.py, SLURM, TPU)
"""
from jaxcourse.parallel.batch import batch_sharding, process_rows, put_global, shard_batch
from jaxcourse.parallel.mesh import (AXES, BATCH_AXES, LAYOUTS, batch_shards, check_batch,
                                     describe, layout_config, make_mesh, mesh_config,
                                     mesh_shape, select_devices)
from jaxcourse.parallel.plan import ShardingPlan
from jaxcourse.parallel.rules import (GPT_RULES, MLP_RULES, RULES, get_rules, logical_to_spec,
                                      match_shardings, sharded_init, specs, tree_shardings,
                                      unbox, use_mesh, without_rules)

__all__ = [
    "AXES", "BATCH_AXES", "GPT_RULES", "LAYOUTS", "MLP_RULES", "RULES", "ShardingPlan",
    "batch_sharding", "batch_shards", "check_batch", "describe", "get_rules", "layout_config",
    "put_global", "logical_to_spec", "make_mesh", "match_shardings", "mesh_config", "mesh_shape",
    "process_rows", "select_devices", "shard_batch", "sharded_init", "specs",
    "tree_shardings", "unbox",
    "use_mesh", "without_rules",
]
