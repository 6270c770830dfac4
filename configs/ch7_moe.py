"""Chapter 7: dense GPT vs MoE GPT at equal active parameters, on Python source + English prose.

python -m jaxcourse.ch7 --config=configs/ch7_moe.py:cpu
Presets: smoke (seconds), cpu (minutes on 2 cores: 4x128 char GPT, 8 experts top-2), gpu.
"""
from jaxcourse.lm.configs import moe_config


def get_config(preset: str = "cpu"):
    return moe_config(preset)
