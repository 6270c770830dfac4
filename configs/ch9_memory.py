"""Chapter 9: memory lab: the largest GPT under a per-device budget, with or without remat and bf16.

python -m jaxcourse.ch9 --config=configs/ch9_memory.py:cpu --config.lab.budget_mib=256
Nothing is trained: each probe compiles the shared loop's step from shapes and reads XLA's
memory analysis. Presets: smoke (tiny, for tests), cpu (4 layers, context 256, batch 16, single
device and FSDP over 8 simulated devices, 256 MiB), gpu (12 layers, context 1024, batch 16,
16 GiB). Writes memory.md and memory.png.
"""
from jaxcourse.ch9 import chapter_config


def get_config(preset: str = "cpu"):
    return chapter_config(preset, "memory")
