"""Chapter 5: MAE pretraining on the digits; probe, fine-tune, vs scratch at 1/10/100% labels.

MAE pretraining of the ViT on the digits (no labels), a linear probe, fine-tuning, and MAE +
fine-tune vs supervised from scratch at 1%, 10% and 100% of the labels.

python -m jaxcourse.ch5 --config=configs/ch5_mae.py:cpu
Presets: smoke (seconds), cpu (2,000 pretraining steps, 600 steps per supervised run; measured
1348.6 s on 2 cores shared at load 7-8), gpu (ViT-Tiny, patch 2, on CIFAR-10 from a local folder,
--config.data.path=/data/cifar10: 2,000 epochs of pretraining at batch 4096, 100 epochs per
supervised run; not run yet).
"""
from jaxcourse.vision.configs import mae_config


def get_config(preset: str = "cpu"):
    return mae_config(preset)
