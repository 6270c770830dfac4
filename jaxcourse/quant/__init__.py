"""Quantization (chapter 4, issue 17): from-scratch post-training and quantization-aware.

weights.py  int8 per-channel / int4 group-wise kernels (packed), whole-tree quantize/dequantize
model.py    QuantizedGPT (dequantize-on-the-fly decode, dynamic W8A8, int8 KV cache),
            w8a8_matmul, the straight-through fake quant and qat_task
kv.py       int8 KV-cache quantization (one scale per token and head); attention imports it

Import the submodules (this package imports nothing, so models/attention.py can use kv.py).
"""
