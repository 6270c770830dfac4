"""RMSNorm and LayerNorm rows on Mosaic GPU (`plgpu.kernel`), shared by rms_norm / layer_norm.

One CTA (one warpgroup) owns `block_rows` whole rows. It TMA-copies its [block_rows, D] tile
(and dy's in the backward, and the parameters) GMEM -> SMEM, then walks the rows one at a time:
a row is loaded into registers as float32, reduced there (sum, sum of squares), normalised and
written back over its own SMEM slot, and the whole tile leaves by one TMA store.

Layout: the wrapper views x [rows, D] as [rows, D / 128, 128] (D zero-padded to a multiple of
128): a TMA box may span at most 256 elements per dimension, so the feature axis is split, and
128 columns keep every row a whole number of 16-byte TMA units in every dtype.

Lowering semantics: Warpgroup. Its layout inference lays the 2-D row out across the 128 threads
and lowers `jnp.sum` over the whole row to an in-warp shuffle + cross-warp SMEM reduction; the
interpreter runs the same jnp code. Lane semantics would make every thread hold and combine its
own slice by hand (explicit layouts, warp shuffles), for no gain in a memory-bound kernel.

Statistics are float32 and are not saved: the backward reads x anyway and recomputes 1/rms (or
mean and 1/std) per row, which costs one extra row reduction and no memory traffic (and no
scalar stores from registers to SMEM). Backward in closed form, g = dy * weight:
    dx = r * (g - x_hat * mean(g * x_hat))        (LayerNorm: also - mean(g))
Each CTA writes its rows' sums of dy * x_hat (and dy) as one float32 row of a [blocks, D] array;
XLA sums the blocks (no atomics).
"""
from __future__ import annotations

import dataclasses
import functools
import warnings

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import _common
from pallas_kernels._common import KernelInputError, pad_to, round_up
from pallas_kernels._norm_rows import BlockSizes

IMPLS = (None, "mosaic", "triton")

LANES = 128                   # columns per feature chunk (see the module docstring)
MAX_CHUNKS = 256              # TMA: <= 256 elements along each box dimension -> D <= 32768
# H100/H200 shared memory per block (Mosaic GPU's limit: 232448 B), less 8 KiB for barriers and
# the alignment of each buffer, which smem_bytes does not count (measured at lowering: 4632 B
# more than smem_bytes for a float32 LayerNorm row of 11392).
SMEM_BYTES = 227 * 1024 - 8192
AUTO_TILE_BYTES = 32 * 1024   # block_rows=0: rows of one x tile in about this many bytes


# ----------------------------------------------------------------------------- block sizes
@dataclasses.dataclass(frozen=True)
class MosaicBlockSizes:
    """block_rows: rows per CTA; 0 picks a power of two with a ~32 KiB x tile (1 to 64 rows)."""
    block_rows: int = 0

    def validate(self):
        if not isinstance(self.block_rows, int) or self.block_rows < 0:
            raise KernelInputError(f"block_sizes.block_rows={self.block_rows!r} must be an int "
                                   f">= 0 (0: automatic)")


@dataclasses.dataclass(frozen=True)
class MosaicSpec:
    """Static description of one call (hashable: a nondiff argument of the custom VJPs)."""
    eps: float
    features: int             # true D: means divide by it
    padded: int               # D rounded up to LANES
    block_rows: int
    layer: bool               # LayerNorm (mean, bias) or RMSNorm
    interpret: object         # plgpu.InterpretGPUParams() or None (compiled)


def smem_bytes(block_rows, padded, itemsize, param_itemsize, n_params):
    """SMEM of the larger kernel: forward (x tile, parameters) or backward (x and dy tiles,
    weight, one float32 partial row per parameter)."""
    tile = block_rows * padded * itemsize
    forward_bytes = tile + n_params * padded * param_itemsize
    return max(forward_bytes, 2 * tile + padded * (param_itemsize + 4 * n_params))


def _auto_rows(padded, itemsize):
    rows = max(1, min(64, AUTO_TILE_BYTES // (padded * itemsize)))
    return 1 << (rows.bit_length() - 1)


# ----------------------------------------------------------------------------- kernel bodies
def _stats(spec, x):
    """Row x [C, LANES] float32 -> (x_hat, 1/rms or 1/std). Padded columns of x are 0."""
    if not spec.layer:
        rstd = lax.rsqrt(jnp.sum(x * x) / spec.features + spec.eps)
        return x * rstd, rstd
    mean = jnp.sum(x) / spec.features
    xc = x - mean
    # Each padded column adds (0 - mean)^2 to the sum of squares: take it out exactly.
    sq = jnp.sum(xc * xc) - (spec.padded - spec.features) * mean * mean
    rstd = lax.rsqrt(jnp.maximum(sq, 0.0) / spec.features + spec.eps)
    return xc * rstd, rstd         # x_hat is -mean * rstd on padded columns; g is 0 there


def _load_tiles(pairs, barriers):
    for i, (src, dst) in enumerate(pairs):
        plgpu.copy_gmem_to_smem(src, dst, barriers.at[i])
    for i in range(len(pairs)):
        plgpu.barrier_wait(barriers.at[i])


def _forward_body(*refs, spec):
    if spec.layer:
        x_ref, w_ref, b_ref, y_ref, x_smem, w_smem, b_smem, bars = refs
    else:
        (x_ref, w_ref, y_ref, x_smem, w_smem, bars), b_ref, b_smem = refs, None, None
    rows = pl.ds(lax.axis_index("rows") * spec.block_rows, spec.block_rows)
    pairs = [(x_ref.at[rows], x_smem), (w_ref, w_smem)] + ([(b_ref, b_smem)] if spec.layer else [])
    _load_tiles(pairs, bars)
    w = w_smem[...].astype(jnp.float32)
    b = b_smem[...].astype(jnp.float32) if spec.layer else None

    @pl.loop(0, spec.block_rows)
    def _row(r):
        x_hat, _ = _stats(spec, x_smem.at[r][...].astype(jnp.float32))
        y = x_hat * w + b if spec.layer else x_hat * w
        x_smem.at[r][...] = y.astype(x_smem.dtype)       # y overwrites its own row of x

    plgpu.commit_smem()                                   # generic-proxy stores before TMA
    plgpu.copy_smem_to_gmem(x_smem, y_ref.at[rows])
    plgpu.wait_smem_to_gmem(0)


def _backward_body(*refs, spec):
    if spec.layer:
        (x_ref, w_ref, dy_ref, dx_ref, dw_ref, db_ref,
         x_smem, dy_smem, w_smem, dw_smem, db_smem, bars) = refs
    else:
        x_ref, w_ref, dy_ref, dx_ref, dw_ref, x_smem, dy_smem, w_smem, dw_smem, bars = refs
    block = lax.axis_index("rows")
    rows = pl.ds(block * spec.block_rows, spec.block_rows)
    _load_tiles([(x_ref.at[rows], x_smem), (dy_ref.at[rows], dy_smem), (w_ref, w_smem)], bars)
    w = w_smem[...].astype(jnp.float32)                   # padded weight is 0, so g is too

    def row(r, sums):
        x_hat, rstd = _stats(spec, x_smem.at[r][...].astype(jnp.float32))
        dy = dy_smem.at[r][...].astype(jnp.float32)
        g = dy * w
        inner = g - x_hat * (jnp.sum(g * x_hat) / spec.features)
        if spec.layer:
            inner = inner - jnp.sum(g) / spec.features
        dy_smem.at[r][...] = (rstd * inner).astype(dy_smem.dtype)   # dx overwrites dy's row
        return (sums[0] + dy * x_hat,) + ((sums[1] + dy,) if spec.layer else ())

    zero = jnp.zeros(w.shape, jnp.float32)
    sums = lax.fori_loop(0, spec.block_rows, row, (zero, zero) if spec.layer else (zero,))
    dw_smem[...] = sums[0]
    if spec.layer:
        db_smem[...] = sums[1]
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(dy_smem, dx_ref.at[rows])
    plgpu.copy_smem_to_gmem(dw_smem, dw_ref.at[block])
    if spec.layer:
        plgpu.copy_smem_to_gmem(db_smem, db_ref.at[block])
    plgpu.wait_smem_to_gmem(0)


def _kernel(body, spec, out_type, scratch, n_rows):
    return plgpu.kernel(
        functools.partial(body, spec=spec), out_type=out_type,
        grid=(n_rows // spec.block_rows,), grid_names=("rows",), scratch_types=scratch,
        compiler_params=plgpu.CompilerParams(
            lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        interpret=spec.interpret)


def forward(spec, x, *params):
    """x [rows, C, LANES], params [C, LANES] each -> y like x."""
    n_rows, chunks, _ = x.shape
    scratch = (plgpu.SMEM((spec.block_rows, chunks, LANES), x.dtype),
               *[plgpu.SMEM((chunks, LANES), p.dtype) for p in params],
               plgpu.Barrier(num_barriers=1 + len(params)))
    return _kernel(_forward_body, spec, jax.ShapeDtypeStruct(x.shape, x.dtype), scratch,
                   n_rows)(x, *params)


def backward(spec, x, w, dy):
    """-> (dx like x, float32 partials [blocks, C, LANES]: dweight, and dbias for LayerNorm)."""
    n_rows, chunks, _ = x.shape
    n_out = 2 if spec.layer else 1
    partial = jax.ShapeDtypeStruct((n_rows // spec.block_rows, chunks, LANES), jnp.float32)
    tile = plgpu.SMEM((spec.block_rows, chunks, LANES), x.dtype)
    scratch = (tile, tile, plgpu.SMEM((chunks, LANES), w.dtype),
               *[plgpu.SMEM((chunks, LANES), jnp.float32)] * n_out, plgpu.Barrier(num_barriers=3))
    out_type = (jax.ShapeDtypeStruct(x.shape, x.dtype),) + (partial,) * n_out
    return _kernel(_backward_body, spec, out_type, scratch, n_rows)(x, w, dy)


# ----------------------------------------------------------------------------- wrapper helpers
def unsupported(x, params, blocks):
    """Why the Mosaic GPU kernels cannot take this call (-> Triton), or None."""
    features = x.shape[-1]
    padded = round_up(features, LANES)
    if padded // LANES > MAX_CHUNKS:
        return f"D={features} > {MAX_CHUNKS * LANES} (TMA box limit)"
    rows = (blocks.block_rows if blocks and blocks.block_rows else 1)
    need = smem_bytes(rows, padded, x.dtype.itemsize, params[0].dtype.itemsize, len(params))
    if need > SMEM_BYTES and not (blocks and blocks.block_rows):
        return f"D={features} ({need} B of shared memory for one row > {SMEM_BYTES})"
    return None


def prepare(x, params, blocks, eps, layer, interpret):
    """-> (x as [rows, C, LANES] padded to whole blocks, params as [C, LANES], MosaicSpec)."""
    blocks = blocks or MosaicBlockSizes()
    blocks.validate()
    features = x.shape[-1]
    padded = round_up(features, LANES)
    n_rows = x.size // features
    block_rows = min(blocks.block_rows or _auto_rows(padded, x.dtype.itemsize), n_rows)
    need = smem_bytes(block_rows, padded, x.dtype.itemsize, params[0].dtype.itemsize,
                      len(params))
    if need > SMEM_BYTES:
        raise KernelInputError(f"block_sizes.block_rows={block_rows} needs {need} B of shared "
                               f"memory at D={features}; at most {SMEM_BYTES}")
    spec = MosaicSpec(eps=float(eps), features=features, padded=padded, block_rows=block_rows,
                      layer=layer, interpret=plgpu.InterpretGPUParams() if interpret else None)
    x2 = pad_to(pad_to(x.reshape(n_rows, features), 1, padded), 0,
                round_up(n_rows, block_rows))
    return (x2.reshape(-1, padded // LANES, LANES),
            [pad_to(p, 0, padded).reshape(-1, LANES) for p in params], spec)


def unpad(y3, x):
    """Padded [rows, C, LANES] result -> x's shape."""
    n_rows = x.size // x.shape[-1]
    return y3.reshape(y3.shape[0], -1)[:n_rows, : x.shape[-1]].reshape(x.shape)


def param_grad(partials, p):
    """Per-block float32 partials [blocks, C, LANES] -> the gradient of parameter p [C, LANES]."""
    return partials.sum(0).astype(p.dtype)


def choose(name, impl, block_sizes, x, params):
    """The `impl` switch of rms_norm / layer_norm -> (True: mosaic | False: triton, blocks).

    None: mosaic on compute capability >= 9.0 (`_common.default_impl`), triton elsewhere or when
    block_sizes is a Triton BlockSizes. A call mosaic cannot take goes to triton, with one
    warning only when impl="mosaic" was asked for by name."""
    if impl not in IMPLS:
        raise KernelInputError(f"impl must be None, 'mosaic' or 'triton'; got {impl!r}")
    if block_sizes is not None and not isinstance(block_sizes, (MosaicBlockSizes, BlockSizes)):
        raise KernelInputError(f"block_sizes must be a BlockSizes or MosaicBlockSizes; got "
                               f"{type(block_sizes).__name__}")
    explicit = impl is not None
    if impl is None:
        impl = "triton" if isinstance(block_sizes, BlockSizes) else _common.default_impl()
    if impl == "triton":
        if isinstance(block_sizes, MosaicBlockSizes):
            raise KernelInputError(f"{name}: impl='triton' takes block_sizes=BlockSizes(...); "
                                   f"got MosaicBlockSizes")
        return False, block_sizes
    if isinstance(block_sizes, BlockSizes):
        raise KernelInputError(f"{name}: impl='mosaic' takes block_sizes=MosaicBlockSizes(...); "
                               f"got BlockSizes")
    why = unsupported(x, params, block_sizes)
    if why is None:
        return True, block_sizes
    if explicit:
        warnings.warn(f"{name}: impl='mosaic' does not support {why}; running the Triton path",
                      stacklevel=3)
    return False, None
