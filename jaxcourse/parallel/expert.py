"""Expert parallelism: the `all_to_all` that sends each token to the device of its expert.

A mixture-of-experts layer (the MoE chapter) routes every token to one or a few of E
experts. With the experts spread over the mesh's `expert` axis (n devices, E/n experts
each), every device first sorts its own tokens into per-expert buffers of fixed capacity,
x[E, C, D] (routing and capacity are the MoE layer's business). Then:

    dispatch:  all_to_all  [E, C, D] -> [E/n, n*C, D]   each local expert gets its tokens
                                                        from all n devices
    experts:   expert e applies its own weights to its n*C tokens
    combine:   all_to_all  [E/n, n*C, D] -> [E, C, D]   results go back to where the
                                                        tokens came from

Each all_to_all moves (n-1)/n of a device's buffer, in contrast to an all-gather of every
token to every device. The functions below run inside `jax.shard_map` over the axis.
"""
from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from jaxcourse.errors import UserError

AXIS = "expert"


def dispatch(x_ExCxD, axis_name: str = AXIS):
    """Per device: [E, C, D] buffers by destination expert -> [E/n, n*C, D] local experts'
    tokens, source device major (rows j*C..(j+1)*C-1 came from device j)."""
    n = jax.lax.axis_size(axis_name)
    e, c = x_ExCxD.shape[:2]
    # Split the expert axis into n chunks (one per device) and exchange them.
    y_NxLxCxD = jax.lax.all_to_all(x_ExCxD.reshape(n, e // n, c, -1), axis_name, 0, 0)
    return jnp.swapaxes(y_NxLxCxD, 0, 1).reshape(e // n, n * c, -1)


def combine(y_LxNCxD, axis_name: str = AXIS):
    """Inverse of `dispatch`: local experts' outputs -> [E, C, D] on the tokens' devices."""
    n = jax.lax.axis_size(axis_name)
    el, nc = y_LxNCxD.shape[:2]
    y_NxLxCxD = jnp.swapaxes(y_LxNCxD.reshape(el, n, nc // n, -1), 0, 1)
    back = jax.lax.all_to_all(y_NxLxCxD, axis_name, 0, 0)
    return back.reshape(n * el, nc // n, -1)


def expert_parallel(expert_fn: Callable, expert_params, x_GxExCxD, mesh: Mesh):
    """y[g, e] = expert_fn(params[e], x[g, e]) with experts and groups split over `expert`.

    expert_params: leaves with a leading expert axis E. x: G token groups (G divisible by
    the axis size; group g lives on device g // (G/n)), each with per-expert buffers [E,C,D].
    """
    n = mesh.shape[AXIS]
    g, e = x_GxExCxD.shape[:2]
    if e % n or g % n:
        raise UserError(f"expert parallelism: {e} experts and {g} token groups must both "
                        f"divide over expert={n} devices")
    if {leaf.shape[0] for leaf in jax.tree.leaves(expert_params)} != {e}:
        raise UserError(f"expert parameters must have a leading axis of {e} experts")

    def local(params_Lx, x_gxExCxD):
        gl, _, c, d = x_gxExCxD.shape
        # Fold the local groups into the capacity axis: one all_to_all for all of them.
        x_ExGCxD = jnp.swapaxes(x_gxExCxD, 0, 1).reshape(e, gl * c, d)
        tokens_LxNGCxD = dispatch(x_ExGCxD)
        out = jax.vmap(expert_fn)(params_Lx, tokens_LxNGCxD)
        y_ExGCxD = combine(out)
        return jnp.swapaxes(y_ExGCxD.reshape(e, gl, c, -1), 0, 1)

    return jax.shard_map(local, mesh=mesh, in_specs=(P(AXIS), P(AXIS)), out_specs=P(AXIS),
                         axis_names={AXIS})(expert_params, x_GxExCxD)
