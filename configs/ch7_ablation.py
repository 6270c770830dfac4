"""Chapter 7: MoE ablation (k, capacity factor, balancing loss on/off, z-loss, aux-free bias).

python -m jaxcourse.ch7 --config=configs/ch7_ablation.py:cpu
Presets: smoke, cpu (each variant trains 400 steps), gpu.
"""
from jaxcourse.lm.configs import moe_config


def get_config(preset: str = "cpu"):
    cfg = moe_config(preset)
    cfg.experiment = "ablation"
    if preset == "cpu":
        cfg.train.steps = 400
        cfg.train.eval_every = 400
    return cfg
