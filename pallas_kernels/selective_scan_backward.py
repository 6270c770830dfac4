"""The backward kernel of pallas_kernels.selective_scan (Mosaic GPU, Lane semantics).

Recomputation, not stored states: the forward saves only the state entering each chunk
(`hs` [b, chunks, n, dim]). One CTA per (batch row, block of channels) walks the chunks from the
last to the first (`plgpu.emit_pipeline` with reversed index maps). Per chunk it re-runs the
forward recurrence from the saved state (the chunk's states stay in registers, `chunk` x n per
thread), then runs the reverse recurrence, with g = dL/dh_t accumulated backwards:

    g   += dy_t * C_t                         dC_t[n] = sum_d dy_t * h_t[n]
    a_t  = exp(delta_t * A)                   dA     += g * delta_t * a_t * h_{t-1}
    ddelta_t = sum_n g * (A * a_t * h_{t-1} + u_t * B_t)
    du_t     = delta_t * sum_n g * B_t        dB_t[n] = sum_d g[n] * delta_t * u_t
    g    = a_t * g                             (dL/dh_{t-1})

dB, dC are sums over channels: a warpgroup reduction per (step, state) inside the CTA, then a
per-CTA partial [b, channel blocks, l, n] summed (and regrouped) by XLA. dA is a per-batch-row
partial, dh0 the gradient of the initial state.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu


def scan_backward(u, delta, a_t, b, c, hs, dy, dlast, bs, per_group_blocks: int, interpret):
    """u, delta, dy [B, Lp, Dp]; a_t [N, Dp]; b, c [B, Lp, G*N]; hs [B, nc, N, Dp]; dlast
    [B, N, Dp] -> du, ddelta [B, Lp, Dp], dA, dh0 [B, N, Dp], dB, dC [B, Dp/bd, Lp, N]."""
    batch, length, dim = u.shape
    n_state = a_t.shape[0]
    bd, ch = bs.block_d, bs.chunk
    nc, nblk = length // ch, dim // bd
    f32 = jnp.float32

    def body(u_ref, dt_ref, a_ref, b_ref, c_ref, hs_ref, dy_ref, dlast_ref,
             du_ref, ddt_ref, da_ref, dh0_ref, db_ref, dc_ref):
        bi, di = lax.axis_index("b"), lax.axis_index("d")
        group = di // per_group_blocks
        channels = pl.ds(di * bd, bd)

        def scoped(a_smem, g_smem, du_smem, ddt_smem, db_smem, dc_smem, a_bar, g_bar):
            plgpu.copy_gmem_to_smem(a_ref.at[:, channels], a_smem, a_bar)
            plgpu.copy_gmem_to_smem(dlast_ref.at[bi, :, channels], g_smem, g_bar)
            plgpu.barrier_wait(a_bar)
            plgpu.barrier_wait(g_bar)
            a_rows = [a_smem[n] for n in range(n_state)]
            carry0 = (tuple(g_smem[n] for n in range(n_state)),
                      tuple(a * 0.0 for a in a_rows))

            def chunk_body(idx, u_s, dt_s, dy_s, b_s, c_s, hs_s, carry):
                g, da = (list(x) for x in carry)
                ci = nc - 1 - idx[0]
                slot = idx[0] % 2
                # Four stores per chunk; the other slot's four may still be reading SMEM.
                plgpu.wait_smem_to_gmem(4, wait_read_only=True)
                du_o, ddt_o, db_o, dc_o = (r.at[slot] for r in
                                           (du_smem, ddt_smem, db_smem, dc_smem))
                hist = [[hs_s[0, n] for n in range(n_state)]]
                for t in range(ch):      # the forward again, from the saved chunk state
                    d_t = dt_s[t]
                    du_t = d_t * u_s[t]
                    hist.append([jnp.exp(d_t * a_rows[n]) * hist[-1][n] + du_t * b_s[t, n]
                                 for n in range(n_state)])
                for t in reversed(range(ch)):
                    d_t, u_t, dy_t = dt_s[t], u_s[t], dy_s[t]
                    du_acc, ddt_acc = None, None
                    for n in range(n_state):
                        g[n] = g[n] + dy_t * c_s[t, n]
                        dc_o[t, n] = jnp.sum(dy_t * hist[t + 1][n])
                        decay = jnp.exp(d_t * a_rows[n])
                        gah = g[n] * decay * hist[t][n]
                        da[n] = da[n] + gah * d_t
                        gb = g[n] * b_s[t, n]
                        term = gah * a_rows[n] + gb * u_t
                        ddt_acc = term if ddt_acc is None else ddt_acc + term
                        du_acc = gb if du_acc is None else du_acc + gb
                        db_o[t, n] = jnp.sum(g[n] * (d_t * u_t))
                        g[n] = decay * g[n]
                    du_o[t] = du_acc * d_t
                    ddt_o[t] = ddt_acc
                plgpu.commit_smem()
                rows = pl.ds(ci * ch, ch)
                plgpu.copy_smem_to_gmem(du_o, du_ref.at[bi, rows, channels])
                plgpu.copy_smem_to_gmem(ddt_o, ddt_ref.at[bi, rows, channels])
                plgpu.copy_smem_to_gmem(db_o, db_ref.at[bi, di, rows])
                plgpu.copy_smem_to_gmem(dc_o, dc_ref.at[bi, di, rows])
                return tuple(g), tuple(da)

            rev = lambda i: (nc - 1 - i, di)  # noqa: E731
            rev_g = lambda i: (nc - 1 - i, group)  # noqa: E731
            g, da = plgpu.emit_pipeline(
                chunk_body, grid=(nc,),
                in_specs=[plgpu.BlockSpec((ch, bd), rev), plgpu.BlockSpec((ch, bd), rev),
                          plgpu.BlockSpec((ch, bd), rev),
                          plgpu.BlockSpec((ch, n_state), rev_g),
                          plgpu.BlockSpec((ch, n_state), rev_g),
                          plgpu.BlockSpec((1, n_state, bd), lambda i: (nc - 1 - i, 0, di))],
                max_concurrent_steps=bs.num_stages, init_carry=carry0,
            )(u_ref.at[bi], dt_ref.at[bi], dy_ref.at[bi], b_ref.at[bi], c_ref.at[bi],
              hs_ref.at[bi])
            plgpu.wait_smem_to_gmem(0)
            for n in range(n_state):
                g_smem[n] = g[n]
                a_smem[n] = da[n]
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(g_smem, dh0_ref.at[bi, :, channels])
            plgpu.copy_smem_to_gmem(a_smem, da_ref.at[bi, :, channels])
            plgpu.wait_smem_to_gmem(0)

        pl.run_scoped(scoped, plgpu.SMEM((n_state, bd), f32), plgpu.SMEM((n_state, bd), f32),
                      plgpu.SMEM((2, ch, bd), f32), plgpu.SMEM((2, ch, bd), f32),
                      plgpu.SMEM((2, ch, n_state), f32), plgpu.SMEM((2, ch, n_state), f32),
                      plgpu.Barrier(num_arrivals=1), plgpu.Barrier(num_arrivals=1))

    act = jax.ShapeDtypeStruct((batch, length, dim), f32)
    state = jax.ShapeDtypeStruct((batch, n_state, dim), f32)
    partial = jax.ShapeDtypeStruct((batch, nblk, length, n_state), f32)
    kernel = plgpu.kernel(
        body, out_type=(act, act, state, state, partial, partial),
        grid=(batch, nblk), grid_names=("b", "d"),
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane),
        interpret=interpret)
    return kernel(u, delta, a_t, b, c, hs, dy, dlast)
