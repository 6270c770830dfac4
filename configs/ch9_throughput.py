"""Chapter 9: throughput math: FLOPs per token by hand, by 6N + 12LTd and by XLA, tokens/s and MFU.

python -m jaxcourse.ch9 --config=configs/ch9_throughput.py:cpu
Presets: smoke (tests), cpu (the chapter-4 4x128 GPT, context 64, batch 12; peak = measured f32
matmul), gpu (GPT-2 small 12x768, context 1024, bf16, cuDNN attention; peak = data-sheet bf16).
"""
from jaxcourse.ch9 import chapter_config


def get_config(preset: str = "cpu"):
    return chapter_config(preset, "throughput")
