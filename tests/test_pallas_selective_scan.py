"""pallas_kernels.selective_scan in Mosaic GPU interpret mode vs the sequential scan (values, the
last state and every gradient), the abstract-H100 lowering at a Mamba production shape, the
`impl="pallas"` switch of jaxcourse's selective_scan, and bad input.

Interpret mode simulates each TMA copy and every step of the recurrence, so the cases are
tiny (one or two 128-channel blocks, a handful of 8-step chunks) and each is one jit of
forward + backward. This file runs against a 40 s single-core budget.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk
from jaxcourse.models.ssm_scan import selective_scan as jc_selective_scan
from pallas_kernels.gpu_check import mosaic_gpu_kernels
from pallas_kernels.selective_scan import BlockSizes

SMALL = BlockSizes(block_d=128, chunk=8, num_stages=2)


def _inputs(b, t, dim, n, groups=None, dtype=jnp.float32, seed=0):
    # numpy draws: no jax compile per shape
    rng = np.random.default_rng(seed)
    bc = (b, t, n) if groups is None else (b, t, groups, n)
    f = lambda x: jnp.asarray(x, np.float32)  # noqa: E731
    return dict(
        u=f(rng.standard_normal((b, t, dim))).astype(dtype),
        delta=f(rng.uniform(0.05, 0.5, (b, t, dim))).astype(dtype),
        A=-f(rng.uniform(0.5, 2.0, (dim, n))),
        B=f(rng.standard_normal(bc)).astype(dtype),
        C=f(rng.standard_normal(bc)).astype(dtype),
        D=f(rng.standard_normal(dim)),
        z=f(rng.standard_normal((b, t, dim))).astype(dtype),
        delta_bias=f(rng.uniform(-1.0, 0.0, dim)),
        initial_state=f(rng.standard_normal((b, dim, n))),
        cot=f(rng.standard_normal((b, t, dim))),
        cot_h=f(rng.standard_normal((b, dim, n))),
    )


def _value_and_grads(fn, inp, names, **kw):
    """(y, last, grads of sum(y * cot) + sum(last * cot_h) w.r.t. `names`)."""
    def loss(*args):
        y, last = fn(**dict(zip(names, args)), return_last_state=True, **kw)
        return (jnp.sum(y.astype(jnp.float32) * inp["cot"]) + jnp.sum(last * inp["cot_h"]),
                (y, last))
    (_, (y, last)), grads = jax.value_and_grad(loss, argnums=tuple(range(len(names))),
                                               has_aux=True)(*[inp[k] for k in names])
    return y, last, grads


def _close(got, want, tol):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * max(1.0, np.abs(want).max()))


def _kernel(**kw):
    return pk.selective_scan(**kw, block_sizes=SMALL)


def _sequential(**kw):
    return jc_selective_scan(**kw, impl="sequential")


# (shape b, t, dim, n, groups; options): every option on with a length (12) that is not a
# multiple of the chunk and a dim (96) padded to the block; no option, with grouped B/C over
# two channel blocks. (Two batch rows: the bfloat16 test.)
CASES = [
    ((1, 12, 96, 4, None), dict(delta_softplus=True),
     ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")),
    ((1, 8, 256, 4, 2), dict(), ("u", "delta", "A", "B", "C")),
]


@pytest.mark.parametrize("shape,opts,names", CASES)
def test_float32_values_state_and_grads_match_sequential(shape, opts, names):
    inp = _inputs(*shape)
    got = jax.jit(lambda: _value_and_grads(_kernel, inp, names, **opts))()
    want = jax.jit(lambda: _value_and_grads(_sequential, inp, names, **opts))()
    _close(got[0], want[0], 1e-5)
    _close(got[1], want[1], 1e-5)
    for name, g, w in zip(names, got[2], want[2]):
        assert g.shape == inp[name].shape, name
        _close(g, w, 1e-4)


def test_bfloat16_two_rows_values_match_sequential_in_float32():
    inp = _inputs(2, 8, 128, 4, dtype=jnp.bfloat16, seed=1)
    args = {k: inp[k] for k in ("u", "delta", "A", "B", "C", "D", "z")}
    got = jax.jit(lambda: _kernel(**args, delta_softplus=True))()
    want = jc_selective_scan(**{k: v.astype(jnp.float32) for k, v in args.items()},
                             delta_softplus=True, impl="sequential")
    assert got.dtype == jnp.bfloat16
    _close(got, want, 2e-2)   # bf16 rounding of y only: the scan runs in float32


def test_impl_pallas_of_the_library_scan_runs_the_kernel():
    inp = _inputs(1, 8, 128, 4, seed=2)
    args = {k: inp[k] for k in ("u", "delta", "A", "B", "C")}
    _close(jc_selective_scan(**args, impl="pallas"), jc_selective_scan(**args, impl="sequential"),
           1e-5)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_lowers_for_h100_at_a_mamba_shape(dtype):
    """Mosaic GPU layout inference, TMA/SMEM layouts and the SMEM budget, without a GPU."""
    s = jax.ShapeDtypeStruct
    b, t, dim, n = 2, 2048, 1536, 16

    def step(u, delta, A, B, C, D, z, delta_bias):
        def loss(u, delta, A, B, C):
            return pk.selective_scan(u, delta, A, B, C, D, z, delta_bias, True,
                                     interpret=False).astype(jnp.float32).sum()
        return jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4))(u, delta, A, B, C)
    act, vec = s((b, t, dim), dtype), s((dim,), jnp.float32)
    modules = mosaic_gpu_kernels(step, act, act, s((dim, n), jnp.float32), s((b, t, n), dtype),
                                 s((b, t, n), dtype), vec, act, vec)
    assert len(modules) == 2 and min(modules) > 1000   # forward (saving states), backward


def _bad(**over):
    inp = _inputs(1, 8, 128, 4)
    kw = {k: inp[k] for k in ("u", "delta", "A", "B", "C")}
    kw.update(over)
    return kw


@pytest.mark.parametrize("over,message", [
    (dict(u=jnp.ones((8, 128))), "wants u and delta"),
    (dict(delta=jnp.ones((1, 8, 64))), "wants u and delta"),
    (dict(A=jnp.ones((64, 4))), "wants A"),
    (dict(A=jnp.ones((128, 4), jnp.complex64)), "real A only"),
    (dict(B=jnp.ones((1, 8, 5))), "wants B"),
    (dict(C=jnp.ones((1, 8, 1, 4))), "must have one shape"),
    (dict(B=jnp.ones((1, 8, 3, 4)), C=jnp.ones((1, 8, 3, 4))), "groups of B/C must be"),
    (dict(D=jnp.ones(64)), "D has shape"),
    (dict(u=jnp.ones((1, 8, 128), jnp.int32)), "u has dtype int32"),
    (dict(block_sizes=BlockSizes(block_d=64)), "block_d=64 must be a positive multiple of 128"),
    (dict(block_sizes=BlockSizes(chunk=12)), "chunk=12 must be a power of two"),
])
def test_bad_input_is_one_line(over, message):
    with pytest.raises(pk.KernelInputError, match=message) as err:
        pk.selective_scan(**_bad(**over))
    assert "\n" not in str(err.value)
