"""Chapter 2: regularizer ablation on digits: each regularizer added alone to a plain baseline.

python -m jaxcourse.ch2 --config=configs/ch2_ablation.py:cpu
"""
from jaxcourse import config


def get_config(preset: str = "cpu"):
    cfg, _, _ = config.load(f"configs/ch2_digits.py:{preset}")
    cfg.experiment = "ablation"
    cfg.model.arch, cfg.model.depth, cfg.model.width = "cnn", 2, 16
    cfg.train.steps = 30 if preset == "smoke" else 300
    cfg.train.eval_every = 10 if preset == "smoke" else 50
    # Variants: "none" (plain), one regularizer at a time, and "all".
    cfg.variants = ("none", "dropout", "weight_decay", "label_smoothing", "augment", "mixup",
                    "cutmix", "batchnorm", "early_stopping", "all")
    if preset == "smoke":
        cfg.variants = ("none", "all")
    return cfg
