"""The scans of the state-space mixers: Mamba's selective scan and Mamba-2's SSD.

Selective scan (Gu & Dao 2023, Algorithm 2), per channel d and state n, channels last:

    h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t      h: [batch, dim, state]
    y_t = <C_t, h_t> + D * u_t,   then  y_t * silu(z_t)

`selective_scan` computes the function of state-spaces/mamba's `selective_scan_ref` (real A)
with u, delta, z as [batch, length, dim] (the reference is channels first). Four
implementations compute the same numbers (tests hold them to 1e-5 in float32, values and
gradients):

    "sequential"   a lax.scan over time: the reference, O(state) memory per step.
    "associative"  lax.associative_scan over (decay, input) pairs: O(log L) depth, the whole
                   [B, L, D, N] state sequence in memory.
    "chunked"      a lax.scan over chunks whose body, the chunk's steps unrolled, is
                   recomputed in the backward (jax.checkpoint): the backward keeps only one
                   state per chunk, the least memory of the XLA impls.
    "analytic"     the default: a time-major, state-major ([B, N, D]) scan over chunks of
                   steps that keeps one state per chunk, and a hand-written backward
                   (`jax.custom_vjp`): chunk by chunk, last to first, the chunk's states are
                   recomputed, then one fused reverse scan runs the adjoint recurrence, each
                   step emitting its gradients. Memory: one state per chunk, like "chunked".

"pallas" calls `pallas_kernels.selective_scan` (Mosaic GPU forward and backward kernels).
Off a GPU it runs in the Mosaic GPU interpreter: correct but slow.

SSD (Dao & Gu 2024, "Transformers are SSMs", Listing 1) has one scalar decay per head, so a
chunk is a masked matmul (the "diagonal blocks") and states pass between chunks:

    S_t = exp(A_t) * S_{t-1} + X_t B_t^T      S: [batch, heads, head_dim, state]
    Y_t = S_t C_t
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxcourse.errors import UserError

SCAN_IMPLS = ("sequential", "associative", "chunked", "analytic", "pallas")


def check_chunk(chunk: int, key: str = "chunk") -> int:
    """Chunked algorithms (and the kernels that follow them) tile time by a power of two."""
    if not isinstance(chunk, int) or chunk <= 0 or chunk & (chunk - 1):
        raise UserError(f"{key}={chunk!r} must be a positive power of two")
    return chunk


def check_state_size(n: int, key: str = "d_state") -> int:
    if not isinstance(n, int) or n <= 0:
        raise UserError(f"{key}={n!r} must be a positive integer (the SSM state size)")
    return n


def _per_channel(M, dim: int):
    """B or C, [b, l, n] or [b, l, g, n] -> [b, l, dim, n] (channel d reads group d // (dim/g),
    the grouping of the reference)."""
    if M.ndim == 3:
        return M[:, :, None, :]
    g = M.shape[2]
    if dim % g:
        raise UserError(f"dim={dim} is not a multiple of the {g} groups of B/C")
    return jnp.repeat(M, dim // g, axis=2)


def _pad_time(x, multiple: int):
    pad = -x.shape[1] % multiple
    if not pad:
        return x
    return jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False, *, impl: str = "analytic", chunk: int = 8,
                   initial_state=None):
    """y [b, l, dim] (and the last state [b, dim, n] if asked) of the selective SSM.

    u, delta, z: [b, l, dim]; A: [dim, n] (real; negative for a stable scan); B, C:
    [b, l, n] or [b, l, groups, n]; D, delta_bias: [dim]. Computed in float32, returned in
    u's dtype. `initial_state` [b, dim, n] continues a scan (decoding from a cache).
    """
    if impl not in SCAN_IMPLS:
        raise UserError(f"selective_scan impl={impl!r} is not one of {', '.join(SCAN_IMPLS)}")
    b, _, dim = u.shape
    if A.ndim != 2 or A.shape[0] != dim or delta.shape != u.shape:
        raise UserError(f"selective_scan: u {u.shape}, delta {delta.shape} and A {A.shape} "
                        "must be [b, l, dim], [b, l, dim] and [dim, state]")
    check_state_size(A.shape[1], "the state size A.shape[1]")
    if impl == "pallas":  # `chunk` does not apply: the kernel has its own block sizes
        import pallas_kernels  # noqa: PLC0415  (pallas_kernels imports this module)
        return pallas_kernels.selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                             return_last_state, initial_state=initial_state)
    dtype_in = u.dtype
    u32, delta = u.astype(jnp.float32), delta.astype(jnp.float32)
    if delta_bias is not None:
        delta = delta + delta_bias.astype(jnp.float32)
    if delta_softplus:
        delta = jax.nn.softplus(delta)
    A = A.astype(jnp.float32)
    B = _per_channel(B.astype(jnp.float32), dim)
    C = _per_channel(C.astype(jnp.float32), dim)
    h0 = (jnp.zeros((b, dim, A.shape[1]), jnp.float32) if initial_state is None
          else initial_state.astype(jnp.float32))
    if impl == "sequential":
        y, last = _sequential(u32, delta, A, B, C, h0)
    elif impl == "associative":
        y, last = _associative(u32, delta, A, B, C, h0)
    elif impl == "analytic":
        y, last = _analytic(u32, delta, A, B, C, h0, check_chunk(chunk))
    else:
        y, last = _chunked(u32, delta, A, B, C, h0, check_chunk(chunk))
    if D is not None:
        y = y + u32 * D.astype(jnp.float32)
    if z is not None:
        y = y * jax.nn.silu(z.astype(jnp.float32))
    y = y.astype(dtype_in)
    return (y, last) if return_last_state else y


def _sequential(u, delta, A, B, C, h0):
    def step(h_BxDxN, xs):
        u_BxD, d_BxD, B_BxDxN, C_BxDxN = xs
        h_BxDxN = (jnp.exp(d_BxD[..., None] * A) * h_BxDxN
                   + (d_BxD * u_BxD)[..., None] * B_BxDxN)
        return h_BxDxN, jnp.sum(h_BxDxN * C_BxDxN, axis=-1)

    # B and C stay [b, l, 1 or dim, n]; the step broadcasts them. Broadcasting them over the
    # channels before the scan made the forward 2x and the gradient 1.5x slower (measured).
    time_major = [jnp.moveaxis(x, 1, 0) for x in (u, delta, B, C)]
    last, y_LxBxD = jax.lax.scan(step, h0, time_major)
    return jnp.moveaxis(y_LxBxD, 0, 1), last


def _combine(left, right):
    """(a1, b1) then (a2, b2) is the map h -> a2 * (a1 * h + b1) + b2."""
    a1, b1 = left
    a2, b2 = right
    return a1 * a2, a2 * b1 + b2


def _associative(u, delta, A, B, C, h0):
    decay = jnp.exp(delta[..., None] * A)
    inputs = (delta * u)[..., None] * B
    decay_cum, h_BxLxDxN = jax.lax.associative_scan(_combine, (decay, inputs), axis=1)
    h_BxLxDxN = h_BxLxDxN + decay_cum * h0[:, None]
    return jnp.sum(h_BxLxDxN * C, axis=-1), h_BxLxDxN[:, -1]


def _chunked(u, delta, A, B, C, h0, chunk):
    b, l, dim = u.shape
    chunk = min(chunk, 1 << max(l - 1, 0).bit_length())  # short inputs: one small chunk
    # Padding is the identity step: delta = 0 gives decay 1 and input 0.
    u, delta = _pad_time(u, chunk), _pad_time(delta, chunk)
    B = _pad_time(jnp.broadcast_to(B, (b, l) + B.shape[2:]), chunk)
    C = _pad_time(jnp.broadcast_to(C, (b, l) + C.shape[2:]), chunk)
    n_chunks = u.shape[1] // chunk

    def split(x):  # [b, L, ...] -> [chunks, b, chunk, ...]
        return jnp.moveaxis(x.reshape((b, n_chunks, chunk) + x.shape[2:]), 1, 0)

    @jax.checkpoint
    def body(h_BxDxN, xs):
        u_c, d_c, B_c, C_c = xs
        decay = jnp.exp(d_c[..., None] * A)
        inputs = (d_c * u_c)[..., None] * B_c
        ys = []
        for i in range(chunk):
            h_BxDxN = decay[:, i] * h_BxDxN + inputs[:, i]
            ys.append(jnp.sum(h_BxDxN * C_c[:, i], axis=-1))
        return h_BxDxN, jnp.stack(ys, axis=1)

    last, y = jax.lax.scan(body, h0, [split(x) for x in (u, delta, B, C)])
    y = jnp.moveaxis(y, 0, 1).reshape(b, n_chunks * chunk, dim)
    return y[:, :l], last


def _analytic_step(A):
    """h_t = exp(delta_t A) h_{t-1} + delta_t u_t B_t, time-major and state-major ([B, N, D]:
    the channels are the vector lanes, a sum over the state a sum of rows)."""
    def step(h_BxNxD, xs):
        u_BxD, d_BxD, B_BxNxK = xs[:3]
        return jnp.exp(d_BxD[:, None] * A) * h_BxNxD + B_BxNxK * (d_BxD * u_BxD)[:, None]
    return step


# The analytic scan's loops over a chunk's steps: the forward's and the backward's reverse
# step are unrolled this many steps (the whole default chunk); the backward's recomputation of
# the chunk's states is not. One layer at [12, 64, 256], state 16, on the 2-core CPU: forward
# 3.30 -> 1.46 ms, gradient 11.22 -> 8.29 ms (unrolling the recomputation too: 16.95 ms).
_UNROLL = 8


def _in_chunks(x, chunk: int):  # [L, ...] -> [L / chunk, chunk, ...]
    return x.reshape((x.shape[0] // chunk, chunk) + x.shape[1:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _analytic_tm(u_LxBxD, d_LxBxD, A_NxD, B_LxBxNxK, C_LxBxNxK, h0_BxNxD, chunk):
    return _analytic_fwd(u_LxBxD, d_LxBxD, A_NxD, B_LxBxNxK, C_LxBxNxK, h0_BxNxD, chunk)[0]


def _analytic_fwd(u, d, A, B, C, h0, chunk):
    """Scans the chunks, each a scan of its steps emitting y_t; keeps each chunk's first
    state only."""
    update = _analytic_step(A)

    def chunk_scan(h_start, xs):
        def step(h, xs):
            h = update(h, xs)
            return h, jnp.sum(h * xs[3], axis=1)
        h_end, y_c = jax.lax.scan(step, h_start, xs, unroll=_UNROLL)
        return h_end, (y_c, h_start)

    last, (y, starts) = jax.lax.scan(chunk_scan, h0,
                                     tuple(_in_chunks(x, chunk) for x in (u, d, B, C)))
    return (y.reshape(u.shape), last), (u, d, A, B, C, starts)


def _analytic_bwd(chunk, res, cotangents):
    """The adjoint runs backwards in time: g_t = dL/dh_t = C_t dy_t + exp(delta_{t+1} A)
    g_{t+1}. Chunk by chunk, last to first: the chunk's states are recomputed from its first
    one, then one fused reverse scan over its steps reads each step's input state h_{t-1} and
    emits the step's gradients; dA accumulates in the carry. Only [chunk, B, N, D] states
    are live at once: on the CPU, whole [L, B, N, D] buffers cost more in fresh memory than
    the recomputation."""
    u, d, A, B, C, starts = res
    gy, glast = cotangents
    shared = B.shape[-1] == 1  # B, C of [L, B, N, 1]: one per state, shared by the channels
    update = _analytic_step(A)

    def step(carry, xs):
        g_next, gA_NxD = carry
        u_BxD, d_BxD, B_BxNxK, C_BxNxK, gy_BxD, h_prev = xs
        g = g_next + C_BxNxK * gy_BxD[:, None]
        decay = jnp.exp(d_BxD[:, None] * A)
        g_decay = g * h_prev * decay                   # d/d(delta A) of the decay term
        gB_sum = jnp.sum(g * B_BxNxK, axis=1)
        g_d = jnp.sum(g_decay * A, axis=1) + u_BxD * gB_sum
        g_B = g * (d_BxD * u_BxD)[:, None]
        g_B = jnp.sum(g_B, axis=2, keepdims=True) if shared else g_B
        gA_NxD = gA_NxD + jnp.sum(g_decay * d_BxD[:, None], axis=0)
        return (decay * g, gA_NxD), (d_BxD * gB_sum, g_d, g_B)

    def chunk_scan(carry, xs):
        u_c, d_c, B_c, C_c, gy_c, h_start = xs
        h_end, h_prev = jax.lax.scan(lambda h, xs: (update(h, xs), h), h_start, (u_c, d_c, B_c))
        carry, (g_u, g_d, g_B) = jax.lax.scan(step, carry, (u_c, d_c, B_c, C_c, gy_c, h_prev),
                                              reverse=True, unroll=_UNROLL)
        g_C = gy_c[:, :, None] * jnp.concatenate([h_prev[1:], h_end[None]])  # h_t dy_t
        g_C = jnp.sum(g_C, axis=3, keepdims=True) if shared else g_C
        return carry, (g_u, g_d, g_B, g_C)

    xs = tuple(_in_chunks(x, chunk) for x in (u, d, B, C, gy)) + (starts,)
    (g_h0, g_A), grads = jax.lax.scan(chunk_scan, (glast, jnp.zeros_like(A)), xs, reverse=True)
    g_u, g_d, g_B, g_C = (g.reshape((-1,) + g.shape[2:]) for g in grads)
    return g_u, g_d, g_A, g_B, g_C, g_h0


_analytic_tm.defvjp(_analytic_fwd, _analytic_bwd)


def _analytic(u, delta, A, B, C, h0, chunk):
    """The chunked forward and the hand-written backward (`_analytic_bwd`): no autodiff
    through the loops. Padding is the identity step (delta = 0: decay 1, input 0)."""
    l = u.shape[1]
    chunk = min(chunk, l)

    def tm(x):  # [b, l, ...] -> [L, b, ...], L a multiple of chunk
        return jnp.moveaxis(_pad_time(x, chunk), 1, 0)
    y, last = _analytic_tm(tm(u), tm(delta), A.T, tm(B).swapaxes(2, 3), tm(C).swapaxes(2, 3),
                           h0.swapaxes(1, 2), chunk)
    return jnp.moveaxis(y[:l], 0, 1), last.swapaxes(1, 2)


def selective_scan_reference(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                             delta_softplus=False, return_last_state=False):
    """The sequential scan: the oracle of the other implementations (and of the kernel)."""
    return selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                          return_last_state, impl="sequential")


# ---------------------------------------------------------------------------------------
# SSD (Mamba-2).

def _heads(M, h: int):
    """B or C [b, l, g, n] with g dividing h -> [b, l, h, n] (head j reads group j // (h/g))."""
    g = M.shape[2]
    if h % g:
        raise UserError(f"n_heads={h} is not a multiple of the {g} groups of B/C")
    return M if g == h else jnp.repeat(M, h // g, axis=2)


def _check_ssd(X, A, B, C):
    b, l, h, _ = X.shape
    if A.shape != (b, l, h) or B.ndim != 4 or B.shape[:2] != (b, l) or C.shape != B.shape:
        raise UserError(f"ssd: X {X.shape}, A {A.shape}, B {B.shape}, C {C.shape} must be "
                        "[b, l, h, p], [b, l, h], [b, l, h|g, n], [b, l, h|g, n]")
    check_state_size(B.shape[-1], "the state size B.shape[-1]")


def _segsum_exp(a_xQ):
    """exp(sum_{j < s <= i} a_s) for i >= j, else 0: the decay from step j to step i, as a
    masked difference of cumulative sums (all exponents <= 0 when a <= 0)."""
    q = a_xQ.shape[-1]
    cum = jnp.cumsum(a_xQ, axis=-1)
    diff = cum[..., :, None] - cum[..., None, :]
    mask = jnp.tril(jnp.ones((q, q), bool))
    return jnp.where(mask, jnp.exp(jnp.where(mask, diff, 0.0)), 0.0)


def ssd(X, A, B, C, chunk, initial_states=None):
    """Mamba-2's state-space dual, chunked: (Y [b, l, h, p], final_state [b, h, p, n]).

    X [b, l, h, p] (inputs already scaled by dt), A [b, l, h] (log decay per step, A*dt),
    B, C [b, l, h, n] (or [b, l, g, n] shared by h/g heads); chunk a power of two (any
    length: the tail is padded with identity steps). `initial_states` [b, h, p, n].
    """
    check_chunk(chunk)
    _check_ssd(X, A, B, C)
    dtype_in = X.dtype
    b, l, h, p = X.shape
    X, A = X.astype(jnp.float32), A.astype(jnp.float32)
    B, C = _heads(B.astype(jnp.float32), h), _heads(C.astype(jnp.float32), h)
    X, A, B, C = (_pad_time(x, chunk) for x in (X, A, B, C))
    nc = X.shape[1] // chunk
    X, A, B, C = (x.reshape((b, nc, chunk) + x.shape[2:]) for x in (X, A, B, C))
    A_BxHxCxQ = jnp.moveaxis(A, 3, 1)
    A_cum = jnp.cumsum(A_BxHxCxQ, axis=-1)
    # 1. Within each chunk: a causal, decay-weighted "attention" C_i.B_j * decay(j -> i).
    L_BxHxCxQxQ = _segsum_exp(A_BxHxCxQ)
    Y_diag = jnp.einsum("bclhn,bcshn,bhcls,bcshp->bclhp", C, B, L_BxHxCxQxQ, X)
    # 2. The state each chunk leaves behind, from its own inputs.
    to_end = jnp.exp(A_cum[..., -1:] - A_cum)
    states = jnp.einsum("bclhn,bhcl,bclhp->bchpn", B, to_end, X)
    # 3. States entering each chunk: a recurrence over chunks, as one masked matmul.
    if initial_states is None:
        initial_states = jnp.zeros((b, h, p, B.shape[-1]), jnp.float32)
    states = jnp.concatenate([initial_states.astype(jnp.float32)[:, None], states], axis=1)
    chunk_decay = _segsum_exp(jnp.pad(A_cum[..., -1], ((0, 0), (0, 0), (1, 0))))
    entering = jnp.einsum("bhzc,bchpn->bzhpn", chunk_decay, states)
    # 4. The entering state read out by C, decayed to each step of the chunk.
    Y_off = jnp.einsum("bclhn,bchpn,bhcl->bclhp", C, entering[:, :-1], jnp.exp(A_cum))
    Y = (Y_diag + Y_off).reshape(b, nc * chunk, h, p)[:, :l]
    return Y.astype(dtype_in), entering[:, -1]


def ssd_reference(X, A, B, C, initial_states=None):
    """The plain recurrence S_t = exp(A_t) S_{t-1} + X_t B_t^T, Y_t = S_t C_t (the oracle)."""
    _check_ssd(X, A, B, C)
    b, _, h, p = X.shape
    B, C = _heads(B.astype(jnp.float32), h), _heads(C.astype(jnp.float32), h)
    S0 = (jnp.zeros((b, h, p, B.shape[-1]), jnp.float32) if initial_states is None
          else initial_states.astype(jnp.float32))

    def step(S, xs):
        x_BxHxP, a_BxH, B_BxHxN, C_BxHxN = xs
        S = (jnp.exp(a_BxH)[..., None, None] * S
             + x_BxHxP[..., :, None] * B_BxHxN[..., None, :])
        return S, jnp.einsum("bhpn,bhn->bhp", S, C_BxHxN)

    xs = [jnp.moveaxis(x.astype(jnp.float32), 1, 0) for x in (X, A, B, C)]
    final, Y = jax.lax.scan(step, S0, xs)
    return jnp.moveaxis(Y, 0, 1).astype(X.dtype), final

