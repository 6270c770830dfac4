"""Mamba's selective scan (Gu & Dao 2023, Algorithm 2) as a Mosaic GPU kernel.

    h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t      h: [dim, state] per batch row
    y_t = <C_t, h_t> (+ D * u_t), then * silu(z_t)

Same signature and numbers as `jaxcourse.models.ssm_scan.selective_scan` (channels last).

Forward kernel (`plgpu.kernel`, Lane semantics): one CTA (one warpgroup, 128 threads) per
(batch row, block of `block_d` channels); thread i owns channel i of the block. Its `state`
values of h stay in registers for the whole length, as `state` vectors [block_d] (each one
register per thread). `plgpu.emit_pipeline` streams chunks of u, delta, B, C over time into SMEM
by TMA (`num_stages` in flight) and writes y back the same way; inside a chunk a `fori_loop`
walks the steps: u_t, delta_t are one SMEM row each, B_t[n], C_t[n] SMEM scalars broadcast to
all threads, and y_t = sum_n h[n] * C_t[n] is a sum over registers (no cross-thread reduction).

Why Lane semantics: the work is elementwise on 1-D vectors plus register-local sums, which Lane
semantics lowers directly (the strided 1-D layout, scalar SMEM reads, vectors carried through
fori_loop and the pipeline). Nothing here is a wgmma or needs layout inference.

The wrapper applies delta_bias/softplus before and D, silu(z) after the kernel in jnp (XLA fuses
those elementwise ops and differentiates them); it pads the length to whole chunks with delta=0
(the identity step: decay 1, input 0) and the channels to whole blocks, then slices.

Backward (`jax.custom_vjp`) recomputes instead of storing the [b, l, dim, state] states: the
forward also writes the state entering each chunk, and the backward kernel
(selective_scan_backward.py) re-runs each chunk's recurrence from it, then the reverse
recurrence for du, ddelta, dA, dB, dC and the initial state's gradient. dD, dz and
ddelta_bias come from XLA's derivative of the jnp around the kernel.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from jaxcourse.models import ssm_scan
from pallas_kernels._common import KernelInputError, check_float, pad_to, resolve_interpret
from pallas_kernels.selective_scan_backward import scan_backward

# One warpgroup; the 1-D strided register layout spreads block_d over its 128 threads.
WARPGROUP = 128


# ----------------------------------------------------------------------------- block sizes
@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiles of the forward kernel (first guess for H100/H200, not tuned on hardware)."""
    block_d: int = 128        # channels per CTA (one per thread)
    # Time steps per pipeline stage. The backward keeps a chunk's chunk + 1 states in
    # registers (n values each per thread): 9 x 16 at n = 16, under the 255-register limit.
    chunk: int = 8
    num_stages: int = 4       # SMEM pipeline depth (TMA copies in flight)

    def validate(self):
        if self.block_d <= 0 or self.block_d % WARPGROUP:
            raise KernelInputError(f"block_sizes.block_d={self.block_d} must be a positive "
                                   f"multiple of {WARPGROUP} (one warpgroup)")
        if self.chunk < 8 or self.chunk & (self.chunk - 1):
            raise KernelInputError(f"block_sizes.chunk={self.chunk} must be a power of two >= 8")
        if self.num_stages < 1:
            raise KernelInputError(f"block_sizes.num_stages={self.num_stages} must be >= 1")


# ----------------------------------------------------------------------------- kernel
def _scan_kernel(u, delta, a_t, b, c, h0, bs: BlockSizes, per_group_blocks: int, interpret,
                 save_states: bool = False):
    """u, delta [B, Lp, Dp] f32; a_t [N, Dp]; b, c [B, Lp, G*N]; h0 [B, N, Dp]
    -> y [B, Lp, Dp], last state [B, N, Dp] (and, save_states, the state entering each chunk
    [B, Lp/chunk, N, Dp] for the backward)."""
    batch, length, dim = u.shape
    n_state = a_t.shape[0]
    bd, ch = bs.block_d, bs.chunk

    def body(u_ref, dt_ref, a_ref, b_ref, c_ref, h0_ref, y_ref, last_ref, *hs_ref):
        bi, di = lax.axis_index("b"), lax.axis_index("d")
        group = di // per_group_blocks

        def scoped(a_smem, h_smem, y_smem, hs_smem, a_bar, h_bar):
            channels = pl.ds(di * bd, bd)
            plgpu.copy_gmem_to_smem(a_ref.at[:, channels], a_smem, a_bar)
            plgpu.copy_gmem_to_smem(h0_ref.at[bi, :, channels], h_smem, h_bar)
            plgpu.barrier_wait(a_bar)
            plgpu.barrier_wait(h_bar)
            a_rows = [a_smem[n] for n in range(n_state)]
            h0 = tuple(h_smem[n] for n in range(n_state))

            def chunk_body(idx, u_s, dt_s, b_s, c_s, h):
                # y goes out by hand, double-buffered: the pipeline's own output copies are
                # predicated, which the interpreter does not run. Before refilling a buffer,
                # wait until at most one store (the other buffer's) still reads SMEM.
                y_s = y_smem.at[idx[0] % 2]
                plgpu.wait_smem_to_gmem(1, wait_read_only=True)
                if save_states:   # the chunk's entering state; the previous chunk's y may
                    h_s = hs_smem.at[idx[0] % 2]     # still be in flight, its state is not
                    for n in range(n_state):
                        h_s[n] = h[n]
                    plgpu.commit_smem()
                    plgpu.copy_smem_to_gmem(h_s, hs_ref[0].at[bi, idx[0], :, channels])

                def step(t, h):
                    d_t = dt_s[t]
                    du_t = d_t * u_s[t]
                    new, y_t = [], None
                    for n in range(n_state):
                        h_n = jnp.exp(d_t * a_rows[n]) * h[n] + du_t * b_s[t, n]
                        new.append(h_n)
                        y_t = h_n * c_s[t, n] if y_t is None else y_t + h_n * c_s[t, n]
                    y_s[t] = y_t
                    return tuple(new)
                h = lax.fori_loop(0, ch, step, h)
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(
                    y_s, y_ref.at[bi, pl.ds(idx[0] * ch, ch), pl.ds(di * bd, bd)])
                return h

            row = lambda i: (i, di)  # noqa: E731
            grp = lambda i: (i, group)  # noqa: E731
            h = plgpu.emit_pipeline(
                chunk_body, grid=(length // ch,),
                in_specs=[plgpu.BlockSpec((ch, bd), row), plgpu.BlockSpec((ch, bd), row),
                          plgpu.BlockSpec((ch, n_state), grp),
                          plgpu.BlockSpec((ch, n_state), grp)],
                max_concurrent_steps=bs.num_stages, init_carry=h0,
            )(u_ref.at[bi], dt_ref.at[bi], b_ref.at[bi], c_ref.at[bi])
            for n in range(n_state):
                h_smem[n] = h[n]
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(h_smem, last_ref.at[bi, :, channels])
            plgpu.wait_smem_to_gmem(0)

        pl.run_scoped(scoped, plgpu.SMEM((n_state, bd), jnp.float32),
                      plgpu.SMEM((n_state, bd), jnp.float32),
                      plgpu.SMEM((2, ch, bd), jnp.float32),
                      plgpu.SMEM((2 if save_states else 1, n_state, bd), jnp.float32),
                      plgpu.Barrier(num_arrivals=1), plgpu.Barrier(num_arrivals=1))

    kernel = plgpu.kernel(
        body,
        out_type=(jax.ShapeDtypeStruct((batch, length, dim), jnp.float32),
                  jax.ShapeDtypeStruct((batch, n_state, dim), jnp.float32))
        + ((jax.ShapeDtypeStruct((batch, length // ch, n_state, dim), jnp.float32),)
           if save_states else ()),
        grid=(batch, dim // bd), grid_names=("b", "d"),
        compiler_params=plgpu.CompilerParams(
            lowering_semantics=plgpu.LoweringSemantics.Lane),
        interpret=interpret)
    return kernel(u, delta, a_t, b, c, h0)


# ----------------------------------------------------------------------------- core + VJP
def _padded(u, delta, A, B, C, h0, bs):
    """Pad to whole chunks (delta=0: identity steps) and blocks; B, C -> [b, Lp, g*n]."""
    batch, length, dim = u.shape
    groups, n_state = B.shape[2], B.shape[3]
    lp = -(-length // bs.chunk) * bs.chunk
    dp = dim if groups > 1 else -(-dim // bs.block_d) * bs.block_d
    pad = lambda x: pad_to(pad_to(x, 1, lp), 2, dp)  # noqa: E731
    flat = lambda m: pad_to(m, 1, lp).reshape(batch, lp, groups * n_state)  # noqa: E731
    return ((pad(u), pad(delta), pad_to(A, 0, dp).T, flat(B), flat(C),
             pad_to(jnp.swapaxes(h0, 1, 2), 2, dp)), dp // groups // bs.block_d)


def _forward(u, delta, A, B, C, h0, bs, interpret, save_states=False):
    """Core scan, all float32: u, delta [b, l, dim]; A [dim, n]; B, C [b, l, g, n]; h0
    [b, dim, n] -> (y [b, l, dim], last state [b, dim, n])."""
    length, dim = u.shape[1:]
    args, per_group = _padded(u, delta, A, B, C, h0, bs)
    y, last, *hs = _scan_kernel(*args, bs, per_group, interpret, save_states)
    out = (y[:, :length, :dim], jnp.swapaxes(last, 1, 2)[:, :dim])
    return (out, (args, hs[0], per_group)) if save_states else out


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _core(u, delta, A, B, C, h0, bs, interpret):
    return _forward(u, delta, A, B, C, h0, bs, interpret)


def _core_fwd(u, delta, A, B, C, h0, bs, interpret):
    out, (args, hs, per_group) = _forward(u, delta, A, B, C, h0, bs, interpret, True)
    return out, (args, hs, per_group, B.shape, u.shape)


def _core_bwd(bs, interpret, res, cot):
    args, hs, per_group, b_shape, (batch, length, dim) = res
    dy, dlast = cot
    u_p = args[0]
    dy_p = pad_to(pad_to(dy, 1, u_p.shape[1]), 2, u_p.shape[2])
    dlast_p = pad_to(jnp.swapaxes(dlast, 1, 2), 2, u_p.shape[2])
    du, ddt, da, dh0, db, dc = scan_backward(*args[:5], hs, dy_p, dlast_p, bs, per_group,
                                             interpret)
    groups, n_state = b_shape[2], b_shape[3]
    nblk = u_p.shape[2] // bs.block_d

    def regroup(partial):  # [b, blocks, Lp, n] -> [b, l, g, n]: sum the blocks of a group
        partial = partial.reshape(batch, groups, nblk // groups, -1, n_state).sum(2)
        return jnp.moveaxis(partial, 1, 2)[:, :length]
    return (du[:, :length, :dim], ddt[:, :length, :dim], da.sum(0).T[:dim], regroup(db),
            regroup(dc), jnp.swapaxes(dh0, 1, 2)[:, :dim])


_core.defvjp(_core_fwd, _core_bwd)


# ----------------------------------------------------------------------------- wrapper
def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False, *, initial_state=None, interpret=None,
                   block_sizes=None):
    """`jaxcourse.models.ssm.selective_scan` (same arguments, channels last) on Mosaic GPU.

    u, delta, z [b, l, dim]; A [dim, n] real; B, C [b, l, n] or [b, l, g, n]; D, delta_bias
    [dim]; initial_state [b, dim, n] continues a scan. float32, bfloat16 or float16; computed
    in float32, returned in u's dtype.
    Grouped B/C need dim / g to be a multiple of block_sizes.block_d.
    `interpret=None`: GPU interpret mode unless the default backend is a GPU (slow on CPU).
    """
    if jnp.ndim(u) != 3 or jnp.shape(delta) != jnp.shape(u):
        raise KernelInputError(f"selective_scan wants u and delta [b, l, dim] of one shape; got "
                               f"{jnp.shape(u)} and {jnp.shape(delta)}")
    b, length, dim = u.shape
    if jnp.ndim(A) != 2 or A.shape[0] != dim:
        raise KernelInputError(f"selective_scan wants A [dim={dim}, state]; got {A.shape}")
    if jnp.iscomplexobj(A):
        raise KernelInputError("selective_scan kernel supports real A only (complex A given)")
    n_state = A.shape[1]
    for name, m in (("B", B), ("C", C)):
        if jnp.ndim(m) not in (3, 4) or m.shape[:2] != (b, length) or m.shape[-1] != n_state:
            raise KernelInputError(f"selective_scan wants {name} [b, l, {n_state}] or "
                                   f"[b, l, groups, {n_state}]; got {jnp.shape(m)}")
    if jnp.shape(B) != jnp.shape(C):
        raise KernelInputError(f"B {jnp.shape(B)} and C {jnp.shape(C)} must have one shape")
    for name, x, shape in (("z", z, u.shape), ("D", D, (dim,)),
                           ("delta_bias", delta_bias, (dim,)),
                           ("initial_state", initial_state, (b, dim, n_state))):
        if x is not None and jnp.shape(x) != shape:
            raise KernelInputError(f"selective_scan: {name} has shape {jnp.shape(x)}, "
                                   f"expected {shape}")
    for name, x in (("u", u), ("delta", delta), ("A", A), ("B", B), ("C", C), ("D", D),
                    ("z", z), ("delta_bias", delta_bias), ("initial_state", initial_state)):
        if x is not None:
            check_float(name, x)
    bs = block_sizes or BlockSizes()
    bs.validate()
    groups = B.shape[2] if B.ndim == 4 else 1
    if dim % groups or (groups > 1 and (dim // groups) % bs.block_d):
        raise KernelInputError(f"selective_scan: dim={dim} / {groups} groups of B/C must be a "
                               f"multiple of block_sizes.block_d={bs.block_d}")
    mode = plgpu.InterpretGPUParams() if resolve_interpret(interpret) else None

    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    u32, dt = f32(u), f32(delta)
    if delta_bias is not None:
        dt = dt + f32(delta_bias)
    if delta_softplus:
        dt = jax.nn.softplus(dt)
    B4 = B if B.ndim == 4 else B[:, :, None]
    C4 = C if C.ndim == 4 else C[:, :, None]
    h0 = (jnp.zeros((b, dim, n_state), jnp.float32) if initial_state is None
          else f32(initial_state))
    y, last = _core(u32, dt, f32(A), f32(B4), f32(C4), h0, bs, mode)
    if D is not None:
        y = y + u32 * f32(D)
    if z is not None:
        y = y * jax.nn.silu(f32(z))
    y = y.astype(u.dtype)
    return (y, last) if return_last_state else y


# ----------------------------------------------------------------------------- reference
def selective_scan_reference(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                             delta_softplus=False, return_last_state=False):
    """The sequential lax.scan of jaxcourse.models.ssm_scan (state-spaces/mamba's
    selective_scan_ref, channels last): the oracle of the kernel."""
    return ssm_scan.selective_scan_reference(u, delta, A, B, C, D, z, delta_bias,
                                             delta_softplus, return_last_state)
