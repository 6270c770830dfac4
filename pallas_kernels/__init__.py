"""Pallas GPU kernels, each beside its plain-jnp reference (the oracle and the fallback).

All run in interpret mode on CPU. On a GPU, the grouped matmul and the selective scan target
Mosaic GPU; flash attention, rms_norm and layer_norm take `impl=None|"mosaic"|"triton"` and
default to Mosaic GPU on Hopper or newer (`_common.default_impl`), to Pallas' Triton lowering
elsewhere, which is also their fallback for cases the Mosaic kernels cannot take.
See pallas_kernels/README.md for the algorithms, block sizes and status.
"""
from pallas_kernels._common import KernelInputError
from pallas_kernels.flash_attention import flash_attention, flash_attention_reference
from pallas_kernels.grouped_matmul import grouped_matmul, grouped_matmul_reference
from pallas_kernels.layer_norm import layer_norm, layer_norm_reference
from pallas_kernels.rms_norm import rms_norm, rms_norm_reference
from pallas_kernels.selective_scan import selective_scan, selective_scan_reference

__all__ = [
    "KernelInputError",
    "flash_attention", "flash_attention_reference",
    "grouped_matmul", "grouped_matmul_reference",
    "layer_norm", "layer_norm_reference",
    "rms_norm", "rms_norm_reference",
    "selective_scan", "selective_scan_reference",
]
