"""Chapter 5: ViT vs chapter 2's ResNet at equal parameters, same data and steps, at 25/50/100% data.

python -m jaxcourse.ch5 --config=configs/ch5_vit_vs_cnn.py:cpu
Presets: smoke, cpu (both models at each training fraction of the digits), gpu (CIFAR-10
from a local folder: --config.data.path=/data/cifar10).
"""
from jaxcourse.vision.configs import vit_config


def get_config(preset: str = "cpu"):
    cfg = vit_config(preset)
    cfg.experiment = "vit_vs_cnn"
    return cfg
