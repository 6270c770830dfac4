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


MOSAIC_TARGET = "mosaic_gpu_v2"


def mosaic_gpu_kernels(fn, *args, device_kind="NVIDIA H100 80GB HBM3"):
    """jit-lower fn(*args) for CUDA; -> the byte sizes of its Mosaic GPU kernel modules.

    For Mosaic GPU (`plgpu.kernel`) jax itself runs, at lowering time and with no GPU, the
    Python half of the compiler: layout inference for sm_90, the lowering of the mosaic_gpu
    dialect (wgmma operand rules, TMA and swizzle layouts), the shared-memory budget of the
    device and the MLIR verifier. A kernel that fails any of these raises here. Left for the GPU:
    the C++ passes of XLA's custom call (LLVM/NVVM to PTX, ptxas) and the run itself.
    """
    device = AbstractDevice(device_kind=device_kind, num_cores=132, platform="cuda")
    mesh = AbstractMesh((1,), ("x",), (AxisType.Explicit,), abstract_device=device)
    with jax.sharding.use_abstract_mesh(mesh):
        lowered = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
    found = []

    def walk(op):
        for region in op.regions:
            for block in region.blocks:
                for inner in block.operations:
                    if (inner.name == "stablehlo.custom_call"
                            and ir.StringAttr(inner.attributes["call_target_name"]).value
                            == MOSAIC_TARGET):
                        config = ir.DictAttr(inner.attributes["mhlo.backend_config"])
                        found.append(len(ir.StringAttr(config["module"]).value_bytes))
                    walk(inner)
    walk(lowered.compiler_ir("stablehlo").operation)
    return found


# ----------------------------------------------------------------------------- CLI: dump TTIR
def _grads(fn, n):
    return jax.grad(lambda *a: fn(*a).astype("float32").sum(), argnums=tuple(range(n)))


def standard_configs():
    """name -> (function, abstract args): the shapes that BENCHMARKS.md reports on."""
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
    import pallas_kernels as pk  # pylint: disable=import-outside-toplevel
    s = jax.ShapeDtypeStruct
    configs = {}
    for d in (64, 128):
        q, kv = s((2, 4096, 2048 // d, d), jnp.bfloat16), s((2, 4096, 512 // d, d), jnp.bfloat16)
        configs[f"attn_bf16_d{d}_causal_gqa4"] = (_grads(
            lambda q, k, v: pk.flash_attention(q, k, v, causal=True, impl="triton",
                                               interpret=False), 3),
            (q, kv, kv))
    q, seg = s((2, 1000, 8, 80), jnp.float16), s((2, 1000), jnp.int32)
    configs["attn_f16_d80_window_segments"] = (_grads(
        lambda q, k, v, ids: pk.flash_attention(q, k, v, window=(128, 0), segment_ids=ids,
                                                impl="triton", interpret=False), 3), (q, q, q, seg))
    q = s((2, 512, 4, 64), jnp.float32)
    configs["attn_f32_d64"] = (_grads(
        lambda q, k, v: pk.flash_attention(q, k, v, impl="triton", interpret=False), 3),
        (q, q, q))
    for d in (1000, 4096, 8192):
        x, p = s((8, 512, d), jnp.bfloat16), s((d,), jnp.bfloat16)
        configs[f"rms_bf16_d{d}"] = (_grads(
            lambda x, w: pk.rms_norm(x, w, impl="triton", interpret=False), 2), (x, p))
        configs[f"ln_bf16_d{d}"] = (_grads(
            lambda x, w, b: pk.layer_norm(x, w, b, impl="triton", interpret=False), 3), (x, p, p))
    return configs


def dump(directory):
    """Write <config>_<kernel>.ttir and meta.json (warps, stages) for standard_configs()."""
    import json  # pylint: disable=import-outside-toplevel
    import pathlib  # pylint: disable=import-outside-toplevel
    import warnings  # pylint: disable=import-outside-toplevel
    out = pathlib.Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    meta = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        for name, (fn, args) in standard_configs().items():
            for kernel in lower_for_gpu(fn, *args):
                assert kernel.verified, kernel.name
                key = f"{name}__{kernel.name}"
                (out / f"{key}.ttir").write_text(kernel.ir)
                meta[key] = {"num_warps": kernel.num_warps, "num_stages": kernel.num_stages}
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    return meta


if __name__ == "__main__":
    import sys  # pylint: disable=import-outside-toplevel
    if len(sys.argv) != 2:
        sys.exit("usage: python -m pallas_kernels.gpu_check OUT_DIR   (writes verified TTIR)")
    print(f"wrote {len(dump(sys.argv[1]))} verified Triton kernels to {sys.argv[1]}")
