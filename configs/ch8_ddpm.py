"""Chapter 8: class-conditional DDPM on digits; DDPM/DDIM/ODE samplers, guidance, Fréchet table.

python -m jaxcourse.ch8                                   # this file, cpu preset (a few minutes)
python -m jaxcourse.ch8 --config=configs/ch8_ddpm.py:smoke
MNIST from a folder with the four idx files:
python -m jaxcourse.ch8 --config.data.name=mnist --config.data.path=/data/mnist \
    --config.model.image_size=28 --config.model.width_mults='(1,2,2)' --config.model.attn_sizes='(7,)'
CIFAR-10 (unpacked cifar-10-batches-py), GPU:
python -m jaxcourse.ch8 --config=configs/ch8_ddpm.py:gpu --config.data.path=/data/cifar10
Sample from a trained model (same config):
python -m jaxcourse.ch8 --config.experiment=sample --config.sample.checkpoint=runs/ch8/ddpm-cpu/model
"""
from jaxcourse.diffusion.configs import diffusion_config


def get_config(preset: str = "cpu"):
    cfg = diffusion_config(preset)
    cfg.experiment = "ddpm"
    return cfg
