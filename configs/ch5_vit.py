"""Chapter 5: a Vision Transformer on the embedded 8x8 digits (patch 2, 16 tokens), attention maps.

python -m jaxcourse.ch5 --config=configs/ch5_vit.py:cpu
Presets: smoke (seconds), cpu (minutes on 2 cores: 4 layers, width 48), gpu (CIFAR-10 from a
local folder: --config.data.path=/data/cifar10).
"""
from jaxcourse.vision.configs import vit_config


def get_config(preset: str = "cpu"):
    return vit_config(preset)
