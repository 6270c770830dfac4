"""pallas_kernels.grouped_matmul in Mosaic GPU interpret mode vs lax.ragged_dot (values and
both gradients), the abstract-H100 lowering of its three kernels, and bad input."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels._common import KernelInputError
from pallas_kernels.gpu_check import mosaic_gpu_kernels
from pallas_kernels.grouped_matmul import (BlockSizes, default_block_sizes, grouped_matmul,
                                           grouped_matmul_reference)

# The smallest legal tiles keep the interpreter's grids at a handful of CTAs.
SMALL = BlockSizes(block_m=64, block_n=64, block_k=64, num_stages=2)


def _operands(m, k, n, g, dtype, seed=0):
    rng = np.random.default_rng(seed)
    lhs = jnp.asarray(rng.standard_normal((m, k)), dtype)
    rhs = jnp.asarray(rng.standard_normal((g, k, n)), dtype)
    cot = jnp.asarray(rng.standard_normal((m, n)), dtype)
    return lhs, rhs, cot


def _value_and_grads(fn, lhs, rhs, sizes, cot):
    out, vjp = jax.vjp(lambda a, b: fn(a, b, sizes), lhs, rhs)
    return (out, *vjp(cot))


def _ragged_f32(lhs, rhs, sizes):
    return jax.lax.ragged_dot(lhs.astype(jnp.float32), rhs.astype(jnp.float32), sizes)


def _close(got, want, tol):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * np.abs(want).max())


# (sizes, K, N): an empty group between two groups that straddle a 64-row tile; one group;
# leading, middle and trailing empty groups; K and N that are not multiples of the tile.
CASES = [
    ([70, 0, 80], 48, 40),
    ([100], 64, 64),
    ([0, 10, 0, 130, 0], 72, 24),
]


@pytest.mark.parametrize("sizes,k,n", CASES)
def test_float32_values_and_grads_match_ragged_dot(sizes, k, n):
    m, sizes = sum(sizes), jnp.array(sizes, jnp.int32)
    lhs, rhs, cot = _operands(m, k, n, len(sizes), jnp.float32)
    kernel = jax.jit(lambda a, b, s, c: _value_and_grads(
        lambda x, y, z: grouped_matmul(x, y, z, block_sizes=SMALL), a, b, s, c))
    got = kernel(lhs, rhs, sizes, cot)
    want = _value_and_grads(jax.lax.ragged_dot, lhs, rhs, sizes, cot)
    for g, w in zip(got, want):
        _close(g, w, 1e-5)
    # Empty groups get exactly zero weight gradients.
    for e in np.flatnonzero(np.asarray(sizes) == 0):
        assert not np.asarray(got[2][e]).any()


def test_bfloat16_values_and_grads_match_ragged_dot():
    sizes = jnp.array([70, 0, 90], jnp.int32)
    lhs, rhs, cot = _operands(160, 64, 64, 3, jnp.bfloat16, seed=1)
    got = jax.jit(lambda a, b, s, c: _value_and_grads(
        lambda x, y, z: grouped_matmul(x, y, z, block_sizes=SMALL), a, b, s, c))(
            lhs, rhs, sizes, cot)
    want = _value_and_grads(_ragged_f32, lhs, rhs, sizes, cot.astype(jnp.float32))
    for g, w in zip(got, want):
        assert g.dtype == jnp.bfloat16
        _close(g, w, 2e-2)  # bf16 rounding of the result (8 bits of mantissa)


def test_traced_sizes_below_m_leave_trailing_rows_zero_like_ragged_dot():
    lhs, rhs, _ = _operands(130, 64, 64, 2, jnp.float32, seed=2)
    sizes = jnp.array([50, 30], jnp.int32)  # 80 of 130 rows; not checked when traced
    got = jax.jit(lambda a, b, s: grouped_matmul(a, b, s, block_sizes=SMALL))(lhs, rhs, sizes)
    _close(got, jax.lax.ragged_dot(lhs, rhs, sizes), 1e-5)
    assert not np.asarray(got[80:]).any() and np.abs(np.asarray(got[:80])).min() > 0


def test_traced_sizes_above_m_clip_like_ragged_dot():
    lhs, rhs, cot = _operands(100, 64, 64, 2, jnp.float32, seed=3)
    sizes = jnp.array([60, 90], jnp.int32)  # 150 > 100 rows: the second group is clipped
    got = jax.jit(lambda a, b, s, c: _value_and_grads(
        lambda x, y, z: grouped_matmul(x, y, z, block_sizes=SMALL), a, b, s, c))(
            lhs, rhs, sizes, cot)
    for g, w in zip(got, _value_and_grads(jax.lax.ragged_dot, lhs, rhs, sizes, cot)):
        _close(g, w, 1e-5)


def test_reference_matches_ragged_dot():
    lhs, rhs, _ = _operands(40, 8, 4, 3, jnp.float32)
    sizes = jnp.array([10, 0, 30], jnp.int32)
    _close(grouped_matmul_reference(lhs, rhs, sizes), jax.lax.ragged_dot(lhs, rhs, sizes), 1e-6)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_lowers_for_h100_with_default_blocks(dtype):
    """Mosaic GPU layout inference, wgmma operand rules and the SMEM budget, without a GPU."""
    s = jax.ShapeDtypeStruct

    def step(lhs, rhs, sizes):
        loss = lambda a, b: grouped_matmul(a, b, sizes, interpret=False).astype(  # noqa: E731
            jnp.float32).sum()
        return jax.value_and_grad(loss, argnums=(0, 1))(lhs, rhs)
    modules = mosaic_gpu_kernels(step, s((1000, 512), dtype), s((8, 512, 200), dtype),
                                 s((8,), jnp.int32))
    assert len(modules) == 3 and min(modules) > 1000  # forward, dlhs, drhs


def test_float32_defaults_fit_hopper_shared_memory():
    assert default_block_sizes(jnp.float32).num_stages == 2
    assert default_block_sizes(jnp.bfloat16).num_stages == 4


@pytest.mark.parametrize("args,message", [
    ((np.ones((4, 8)), np.ones((2, 8, 3)), np.array([1, 2])), "sum to 3, not to the 4 rows"),
    ((np.ones((4, 8)), np.ones((2, 7, 3)), np.array([2, 2])), "shapes disagree"),
    ((np.ones((4, 8)), np.ones((3, 8, 3)), np.array([2, 2])), "shapes disagree"),
    ((np.ones((4, 8, 1)), np.ones((2, 8, 3)), np.array([2, 2])), "ranks 3, 3, 1"),
    ((np.ones((4, 8), np.float32), np.ones((2, 8, 3), np.float16), np.array([2, 2])),
     "dtype float32 != rhs dtype float16"),
    ((np.ones((4, 8), np.int32), np.ones((2, 8, 3), np.int32), np.array([2, 2])),
     "lhs has dtype int32"),
    ((np.ones((4, 8)), np.ones((2, 8, 3)), np.array([2.0, 2.0])), "expected integers"),
])
def test_bad_input_is_one_line(args, message):
    lhs, rhs, sizes = (jnp.asarray(a) for a in args)
    with pytest.raises(KernelInputError, match=message) as err:
        grouped_matmul(lhs, rhs, sizes)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("blocks,message", [
    (BlockSizes(block_m=96), "block_m=96 must be a positive multiple of 64"),
    (BlockSizes(block_n=32), "block_n=32"),
    (BlockSizes(block_k=320), "at most 256"),
    (BlockSizes(num_stages=1), "num_stages=1 must be >= 2"),
])
def test_block_sizes_must_be_hardware_tiles(blocks, message):
    lhs, rhs, _ = _operands(4, 8, 3, 2, jnp.float32)
    with pytest.raises(KernelInputError, match=message):
        grouped_matmul(lhs, rhs, jnp.array([2, 2]), block_sizes=blocks)
