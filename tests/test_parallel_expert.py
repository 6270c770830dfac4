"""Expert parallelism: all_to_all dispatch / combine give each expert exactly its tokens."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcourse.errors import UserError
from jaxcourse.parallel import make_mesh
from jaxcourse.parallel.expert import expert_parallel


def test_expert_parallel_matches_every_expert_applied_in_place():
    mesh = make_mesh({"expert": 4, "data": 2})
    e, g, c, d, f = 8, 8, 3, 5, 6  # experts, token groups, capacity, width, expert output
    w = jax.random.normal(jax.random.key(0), (e, d, f))
    x = jax.random.normal(jax.random.key(1), (g, e, c, d))
    # Expert k also adds k, so a token sent to the wrong expert (or returned to the wrong
    # place) shows up.
    params = (w, jnp.arange(e, dtype=jnp.float32))
    fn = lambda p, t: jnp.tanh(t @ p[0]) + p[1]  # noqa: E731

    def reference(params, x):
        return jnp.tanh(jnp.einsum("gecd,edf->gecf", x, params[0])) + params[1][None, :, None, None]

    with jax.set_mesh(mesh):
        run = jax.jit(lambda p, x: expert_parallel(fn, p, x, mesh))
        np.testing.assert_allclose(run(params, x), reference(params, x), atol=1e-6)
        grad = jax.jit(jax.grad(lambda p, x: expert_parallel(fn, p, x, mesh).sum()))(params, x)
        assert "all-to-all" in run.lower(params, x).compile().as_text()
    ref_grad = jax.grad(lambda p, x: reference(p, x).sum())(params, x)
    for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(ref_grad)):
        np.testing.assert_allclose(a, b, atol=1e-5)
    with pytest.raises(UserError, match="must both divide over expert=4"):
        expert_parallel(fn, params, x[:6], mesh)
