"""Row-blocked plumbing shared by rms_norm and layer_norm.

x [..., D] is flattened to [rows, D], D zero-padded to a power of two (Triton tiles need it;
the kernels divide by the true D and mask the padded columns), rows padded to whole blocks.
One program owns `block_rows` full rows, so a row's statistics never cross programs.
"""
import dataclasses

import jax
from jax.experimental import pallas as pl

from pallas_kernels import _common
from pallas_kernels._common import KernelInputError


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """block_rows 0: as many rows as fit ~4096 elements per tile."""
    block_rows: int = 0
    num_warps: int = 0          # 0: 4 up to 1024 padded features, 8 up to 4096, else 16


@dataclasses.dataclass(frozen=True)
class Spec:
    """Static description of one call (hashable: a nondiff argument of the custom VJPs)."""
    eps: float
    features: int               # true D (means divide by it)
    block_rows: int
    num_warps: int
    interpret: bool


def _tile_rows(blocks, rows, width):
    wanted = blocks.block_rows or max(1, 4096 // width)
    if wanted & (wanted - 1):
        raise KernelInputError(f"block_rows must be a power of two; got {wanted}")
    return min(wanted, _common.next_pow2(rows))


def check_args(x, params):
    """x [..., D] float; every parameter a float vector [D]."""
    if getattr(x, "ndim", 0) < 1:
        raise KernelInputError(f"x must have a feature axis; got {getattr(x, 'shape', x)!r}")
    _common.check_float("x", x)
    for name, p in params.items():
        if tuple(getattr(p, "shape", ())) != (x.shape[-1],):
            raise KernelInputError(f"{name} must have shape ({x.shape[-1]},) to match x's last "
                                   f"axis; got {getattr(p, 'shape', type(p).__name__)}")
        _common.check_float(name, p)


def prepare(x, params, blocks, eps, interpret):
    """-> (x as padded [rows, width], params padded to [width], Spec)."""
    features = x.shape[-1]
    rows = x.size // features
    width = max(_common.MIN_TILE, _common.next_pow2(features))
    block_rows = _tile_rows(blocks or BlockSizes(), rows, width)
    num_warps = (blocks and blocks.num_warps) or (
        4 if width <= 1024 else 8 if width <= 4096 else 16)
    spec = Spec(eps=float(eps), features=features, block_rows=block_rows, num_warps=num_warps,
                interpret=_common.resolve_interpret(interpret))
    x2 = _common.pad_to(x.reshape(rows, features), 1, width)
    x2 = _common.pad_to(x2, 0, _common.round_up(rows, block_rows))
    return x2, [_common.pad_to(p, 0, width) for p in params], spec


def unpad(y2, x):
    """Padded [rows, width] result -> x's shape."""
    return y2[: x.size // x.shape[-1], : x.shape[-1]].reshape(x.shape)


# Kinds of operands: "rows" [rows, width] by blocks, "stat" [rows] by blocks,
# "param" [width] whole in every program, "partial" [blocks, width] one row per program.
def call(kernel, spec, ins, outs, name):
    """pallas_call over row blocks. ins: [(array, kind)]; outs: [(dtype, kind)]."""
    rows, width = ins[0][0].shape
    n = rows // spec.block_rows
    br = spec.block_rows
    specs = {
        "rows": pl.BlockSpec((br, width), lambda i: (i, 0)),
        "stat": pl.BlockSpec((br,), lambda i: (i,)),
        "param": pl.BlockSpec((width,), lambda i: (0,)),
        "partial": pl.BlockSpec((None, width), lambda i: (i, 0)),
    }
    shapes = {"rows": (rows, width), "stat": (rows,), "partial": (n, width)}
    return pl.pallas_call(
        kernel,
        grid=(n,),
        in_specs=[specs[kind] for _, kind in ins],
        out_specs=[specs[kind] for _, kind in outs],
        out_shape=[jax.ShapeDtypeStruct(shapes[kind], dtype) for dtype, kind in outs],
        compiler_params=_common.gpu_params(spec.num_warps, 1),
        interpret=spec.interpret,
        name=name,
    )(*[a for a, _ in ins])
