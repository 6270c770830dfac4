"""What the training loop needs to run sharded: the mesh, the state's shardings, the batches.

A config with a `mesh` section trains sharded; one without trains exactly as before. The
plan is the loop's only contact with parallelism:

    plan = ShardingPlan.from_config(cfg)        # None when cfg has no `mesh` section
                                                # (mesh.mesh_config() builds one)
    shardings = plan.state_shardings(abstract_state, abstract_params_boxed)
    state = jax.jit(init, out_shardings=shardings)(rng)
    with plan.context():                        # mesh + rules while tracing
        step = jax.jit(multi_step, in_shardings=(shardings, plan.batches_sharding()), ...)
    state, metrics = step(state, plan.put_batches(stacked_numpy_batches))
"""
from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxcourse.parallel.batch import batch_sharding, put_global
from jaxcourse.parallel.mesh import batch_shards, check_batch, make_mesh
from jaxcourse.parallel.rules import (Rules, get_rules, match_shardings, tree_shardings, unbox,
                                      use_mesh)


@dataclasses.dataclass(frozen=True)
class ShardingPlan:
    mesh: Mesh
    rules: Rules
    batch_size: int = 0  # train.batch_size: tells a process's share of a batch from all of it

    @classmethod
    def from_config(cls, cfg) -> ShardingPlan | None:
        section = cfg.get("mesh") if hasattr(cfg, "get") else None
        if section is None:
            return None
        plan = cls(make_mesh(section), get_rules(section.get("rules", "gpt")),
                   cfg.train.get("batch_size", 0) or 0)
        # The batch each device sees per microbatch must split evenly: fail before compiling.
        check_batch(cfg.train.batch_size // max(cfg.train.grad_accum, 1), plan.mesh)
        return plan

    def context(self):
        return use_mesh(self.mesh, self.rules)

    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    def state_shardings(self, abstract_state, boxed_params):
        """Shardings for a TrainState: params (and EMA) by the rules from their logical
        names, optimizer moments like their parameters, everything else replicated."""
        params = tree_shardings(boxed_params, self.rules, self.mesh)
        plain = unbox(boxed_params)
        splits_params = any(self.mesh.shape[a] > 1 for a in ("fsdp", "tensor", "pipeline"))
        if splits_params and all(s.spec == P() for s in jax.tree.leaves(params)):
            warnings.warn("no parameter carries logical axis names (does task.init unbox "
                          "them?): every parameter is replicated on this mesh")
        rep = self.replicated()
        return abstract_state.replace(
            step=rep, rng=rep, params=params,
            opt_state=match_shardings(abstract_state.opt_state, plain, params, self.mesh),
            model_state=jax.tree.map(lambda _: rep, abstract_state.model_state),
            ema_params=None if abstract_state.ema_params is None else params)

    def batches_sharding(self, leading: int = 1) -> NamedSharding:
        """[K, B, ...] stacked batches: B split over the batch axes (leading=1 skips K)."""
        return batch_sharding(self.mesh, leading)

    def put_batches(self, stacked: Mapping[str, np.ndarray], leading: int = 1) -> dict:
        """Global arrays from each process's rows of the stacked batches (data.pipeline
        loads only those), or from whole batches that every process produced alike."""
        return put_global(stacked, self.mesh, leading, self.batch_size)

    def put_eval(self, batch: Mapping[str, np.ndarray]) -> dict:
        """An eval batch: sharded like training batches when it divides, else replicated."""
        b = np.shape(jax.tree.leaves(batch)[0])[0]
        if b % batch_shards(self.mesh) == 0:
            return put_global(batch, self.mesh)
        rep = self.replicated()
        return jax.tree.map(
            lambda x: jax.make_array_from_process_local_data(rep, np.asarray(x), np.shape(x)),
            dict(batch))

