"""Helpers shared by the kernels: input errors, interpret-mode choice, padding, GPU params.

Every kernel pads its operands up to whole blocks (and the feature / head dimension up to a
power of two) in the wrapper and masks the padding inside the kernel. That keeps one kernel
body for interpret mode and for the Triton lowering, which has no bounds checks on loads and
needs power-of-two tile shapes.
"""
import jax
import jax.numpy as jnp
from jax.experimental.pallas import triton as pl_triton

from jaxcourse.errors import UserError

FLOAT_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))

# Triton's tensor-core dot needs every tile side >= 16.
MIN_TILE = 16


class KernelInputError(UserError, ValueError):
    """A kernel argument has the wrong shape, dtype or value; the message names it.

    It is a ``UserError`` (the CLI prints one line) and a ``ValueError`` (plain Python code
    catching bad values keeps working).
    """


def resolve_interpret(interpret):
    """None -> interpret mode unless the default backend is a GPU."""
    if interpret is None:
        return jax.default_backend() != "gpu"
    return bool(interpret)


def default_impl():
    """The `impl=None` rule of every kernel with a Mosaic GPU and a Triton path: "mosaic" when
    the default backend is a GPU of compute capability >= 9.0 (Hopper or newer), else "triton"
    (which also keeps CPU tests on the fast pallas_call interpreter)."""
    if jax.default_backend() != "gpu":
        return "triton"
    capability = getattr(jax.devices()[0], "compute_capability", None)
    return "mosaic" if capability is not None and float(capability) >= 9.0 else "triton"


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def tile(requested: int, length: int) -> int:
    """Block size actually used: a power of two >= 16, no bigger than the padded length."""
    if requested < MIN_TILE or requested & (requested - 1):
        raise KernelInputError(f"block size {requested} must be a power of two >= {MIN_TILE}")
    return max(MIN_TILE, min(requested, next_pow2(length)))


def pad_to(x, axis: int, size: int):
    """Zero-pad `x` along `axis` up to `size` (no copy when it already has that size)."""
    extra = size - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths)


def check_float(name: str, x) -> None:
    dtype = jnp.dtype(x.dtype if hasattr(x, "dtype") else jnp.asarray(x).dtype)
    if dtype not in FLOAT_DTYPES:
        raise KernelInputError(f"{name} has dtype {dtype}; expected float32, bfloat16 or float16")


def gpu_params(num_warps: int, num_stages: int):
    """Compiler parameters of the Triton lowering (ignored in interpret mode)."""
    return pl_triton.CompilerParams(num_warps=num_warps, num_stages=num_stages)
