"""Chapter 9: the GPT under each layout of one mesh (dp, fsdp, tp, fsdp+tp, pipeline) vs one device.

python -m jaxcourse.ch9 --config=configs/ch9_layouts.py:cpu
Presets: smoke (tiny GPT, 4 steps, for tests), cpu (4x128 GPT, context 64, 8 simulated CPU
devices), gpu (12x768 GPT, context 1024, 8 GPUs). Writes layouts.md: loss difference vs single
device, per-device parameter + optimizer bytes, step time and tokens/s per layout.
--config.parallel.layouts picks the layouts.
"""
from jaxcourse.parallel.configs import mesh_gpt_config


def get_config(preset: str = "cpu"):
    return mesh_gpt_config(preset, "layouts")
