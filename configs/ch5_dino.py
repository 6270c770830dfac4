"""Chapter 5: DINO on the digits; k-NN and linear probe vs a random-init encoder, collapse monitor.

DINO self-distillation of the ViT on the digits; k-NN and a linear probe of the teacher's
encoder against a random-init one of the same architecture.

python -m jaxcourse.ch5 --config=configs/ch5_dino.py:cpu
Presets: smoke (seconds), cpu (minutes on 2 cores: 500 steps, 2 global + 4 local crops),
gpu (CIFAR-10 from a local folder: --config.data.path=/data/cifar10).
"""
from jaxcourse.vision.configs import dino_config


def get_config(preset: str = "cpu"):
    return dino_config(preset)
