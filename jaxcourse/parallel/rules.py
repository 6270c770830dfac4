"""Logical-axis rules: how a model's named dimensions map onto the mesh axes.

A model says what its dimensions *are* ("embed", "heads", "mlp", ...); a short rule table per
model family says where each kind of dimension lives on the mesh. One table serves every layout,
because an axis of size 1 drops out of the spec: with `tensor=1` the "heads -> tensor" rule
does nothing, with `tensor=4` it is the Megatron split.

Rules are tried in order and a mesh axis is used at most once per array (as in flax's
`logical_to_mesh_axes`): for the activation ("batch", "length", "embed") the batch takes
`fsdp`, so "embed -> fsdp" finds it used and the embedding stays whole, while a weight
("embed", "mlp") gets `fsdp` on its rows and `tensor` on its columns.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxcourse.errors import UserError
from jaxcourse.parallel.mesh import BATCH_AXES

Rules = Sequence[tuple[str, Any]]

# GPT (chapters 3-4, 9). Megatron tensor parallelism: q/k/v and the MLP's first matrix are
# split by columns (heads, mlp), the attention output and MLP's second matrix by rows, so
# each block needs one all-reduce forward and one backward. FSDP shards "embed", which every
# weight matrix has, so every parameter (and its optimizer state) is split.
GPT_RULES: Rules = (
    ("batch", BATCH_AXES),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("embed", "fsdp"),
    ("expert", "expert"),
    ("layers", "pipeline"),
    ("length", None),
    ("head_dim", None),
)

# Plain MLPs / CNNs of the early chapters: data parallel plus FSDP on the hidden width.
MLP_RULES: Rules = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("length", None),
)

RULES: dict[str, Rules] = {"gpt": GPT_RULES, "mlp": MLP_RULES}


def get_rules(name: str) -> Rules:
    if name not in RULES:
        raise UserError(f"unknown sharding rules {name!r}; choose one of {', '.join(RULES)}")
    return RULES[name]


def _as_tuple(mesh_axes) -> tuple[str, ...]:
    if mesh_axes is None:
        return ()
    return (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)


def logical_to_spec(logical: Sequence[str | None], rules: Rules, mesh: Mesh) -> P:
    """PartitionSpec for one array whose dimensions carry the given logical names."""
    known = {name for name, _ in rules}
    used: set[str] = set()
    spec = []
    for name in logical:
        if name is None:
            spec.append(None)
            continue
        if name not in known:
            raise UserError(f"logical axis {name!r} has no sharding rule (rules cover "
                            f"{', '.join(sorted(known))})")
        chosen: tuple[str, ...] = ()
        for rule_name, mesh_axes in rules:
            axes = _as_tuple(mesh_axes)
            if rule_name == name and not used & set(axes):
                chosen = axes
                break
        used |= set(chosen)
        live = tuple(a for a in chosen if mesh.shape[a] > 1)  # size-1 axes change nothing
        spec.append(None if not live else live[0] if len(live) == 1 else live)
    while spec and spec[-1] is None:
        spec.pop()
    return P(*spec)


def _check_divisible(path: str, shape: Sequence[int], spec: P, mesh: Mesh) -> None:
    for dim, (size, axes) in enumerate(zip(shape, spec)):
        ways = math.prod(mesh.shape[a] for a in _as_tuple(axes))
        if size % ways:
            raise UserError(f"{path}: dimension {dim} of size {size} cannot be split "
                            f"{ways} ways over mesh axes {_as_tuple(axes)}")


def unbox(tree):
    """Strips flax's partitioning boxes without adding sharding constraints (the shardings
    are given to jit explicitly; a constraint on an abstract value would fail)."""
    return jax.tree.map(lambda x: x.value if isinstance(x, nn.Partitioned) else x, tree,
                        is_leaf=lambda x: isinstance(x, nn.Partitioned))


def tree_shardings(abstract_tree, rules: Rules, mesh: Mesh):
    """NamedShardings for a (possibly boxed) tree from `jax.eval_shape(model.init, ...)`.

    Leaves boxed with `nn.with_logical_partitioning` follow the rules; other leaves are
    replicated. The result has the structure of the *unboxed* tree.
    """
    logical = nn.get_partition_spec(abstract_tree)
    unboxed = unbox(abstract_tree)

    def one(path, leaf, names):
        spec = logical_to_spec(tuple(names), rules, mesh)
        _check_divisible(jax.tree_util.keystr(path), leaf.shape, spec, mesh)
        return NamedSharding(mesh, spec)

    return jax.tree_util.tree_map_with_path(one, unboxed, logical)


def sharded_init(init_fn, rules: Rules, mesh: Mesh, *args):
    """Runs `init_fn(*args)` so each parameter is created directly in its shard.

    eval_shape -> shardings -> jit(init, out_shardings): no device ever holds the full
    unsharded model. Returns (unboxed tree, shardings).
    """
    with without_rules():
        abstract = jax.eval_shape(init_fn, *args)
        shardings = tree_shardings(abstract, rules, mesh)
        tree = jax.jit(lambda *a: unbox(init_fn(*a)), out_shardings=shardings)(*args)
    return tree, shardings


def without_rules():
    """Context in which flax's logical constraints are no-ops.

    Init is traced here: flax's DenseGeneral reshapes a boxed kernel and would apply the
    kernel's (rank-3) constraint to its flat (rank-2) form. The out_shardings of the jitted
    init place the parameters anyway.
    """
    return nn.logical_axis_rules(())


def match_shardings(abstract_tree, reference_tree, reference_shardings, mesh: Mesh):
    """Shardings for a tree that mirrors parameters (optimizer moments, EMA copies, grads).

    A leaf whose key path ends with a parameter's key path and has the same shape gets that
    parameter's sharding (so Adam's mu/nu are split exactly like the weights: ZeRO); any
    other leaf (step counters, factored statistics) is replicated.
    """
    by_path = {}
    for (path, leaf), sharding in zip(jax.tree_util.tree_leaves_with_path(reference_tree),
                                      jax.tree_util.tree_leaves(reference_shardings)):
        by_path[tuple(path)] = (tuple(leaf.shape), sharding)
    replicated = NamedSharding(mesh, P())

    def one(path, leaf):
        path = tuple(path)
        for start in range(len(path)):
            hit = by_path.get(path[start:])
            if hit and hit[0] == tuple(getattr(leaf, "shape", ())):
                return hit[1]
        return replicated

    return jax.tree_util.tree_map_with_path(one, abstract_tree)


def specs(shardings) -> Any:
    """The PartitionSpecs of a tree of NamedShardings (for printing and golden tests)."""
    return jax.tree.map(lambda s: s.spec, shardings)


def _dense_general_without_rules(next_fun, args, kwargs, context):
    """Runs flax's DenseGeneral with the logical rules switched off.

    DenseGeneral initializes a multi-axis kernel in flattened (2-D) form and unboxes it
    there, which applies the kernel's rank-3 logical constraint to a rank-2 value; flax
    even does this during apply (it re-derives the parameter's shape from the
    initializer). DenseGeneral itself has no activation constraints, and its kernel's
    placement comes from the jit shardings, so nothing is lost.
    """
    if isinstance(context.module, nn.DenseGeneral):
        with without_rules():
            return next_fun(*args, **kwargs)
    return next_fun(*args, **kwargs)


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: Rules):
    """Mesh + logical rules active while tracing, so `nn.with_logical_constraint` in the
    model pins activations (e.g. ("batch", "length", "embed") at block boundaries)."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules), \
            nn.intercept_methods(_dense_general_without_rules):
        yield
