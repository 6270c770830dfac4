"""Lower a function for an NVIDIA GPU on any machine and check its Triton kernels.

With no GPU at hand this is the strongest check available: jax traces `fn` for an abstract
CUDA device, Pallas lowers every kernel to Triton IR (the step that fails on unsupported
operations, non-power-of-two tiles and bad block specs), and the Triton dialect verifier
checks each module. What it cannot check is the rest of Triton's pipeline (layouts, shared
memory, register allocation, PTX); that only happens when XLA compiles on a real GPU.

Uses jax internals (jax._src.lib.triton, the custom call's backend config), which is why
pyproject pins jax < 0.12.
"""
import dataclasses

import jax
from jax._src.interpreters import mlir
from jax._src.lib.mlir import ir
from jax._src.lib.triton import dialect as tt_dialect
from jax.sharding import AbstractDevice, AbstractMesh, AxisType

TRITON_TARGET = "__gpu$xla.gpu.triton"


@dataclasses.dataclass(frozen=True)
class TritonKernel:
    name: str
    num_warps: int
    num_stages: int
    grid: tuple[int, int, int]
    verified: bool              # the Triton dialect verifier accepted the module
    ir: str


def _triton_calls(op, found):
    for region in op.regions:
        for block in region.blocks:
            for inner in block.operations:
                if (inner.name == "stablehlo.custom_call"
                        and ir.StringAttr(inner.attributes["call_target_name"]).value
                        == TRITON_TARGET):
                    found.append(inner.attributes["mhlo.backend_config"])
                _triton_calls(inner, found)
    return found


def _int(config, key):
    return ir.IntegerAttr(config[key]).value


def lower_for_gpu(fn, *args, device_kind="NVIDIA H100 80GB HBM3"):
    """jit-lower fn(*args) (arrays or ShapeDtypeStructs) for CUDA; -> [TritonKernel]."""
    device = AbstractDevice(device_kind=device_kind, num_cores=132, platform="cuda")
    mesh = AbstractMesh((1,), ("x",), (AxisType.Explicit,), abstract_device=device)
    with jax.sharding.use_abstract_mesh(mesh):
        lowered = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
    configs = _triton_calls(lowered.compiler_ir("stablehlo").operation, [])
    ctx = mlir.JaxIrContext()
    ctx.append_dialect_registry(mlir.upstream_dialects)
    tt_dialect.register_dialect(ctx)
    ctx.load_all_available_dialects()
    kernels = []
    with ctx:
        for config in configs:
            module = ir.Module.parse(ir.StringAttr(config["ir"]).value_bytes)
            kernels.append(TritonKernel(
                name=ir.StringAttr(config["name"]).value,
                num_warps=_int(config, "num_warps"), num_stages=_int(config, "num_stages"),
                grid=(_int(config, "grid_x"), _int(config, "grid_y"), _int(config, "grid_z")),
                verified=module.operation.verify(), ir=str(module)))
    return kernels
