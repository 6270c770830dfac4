"""Chapter 7's research sketch: a domain curriculum for the router. Single-domain batches
(code, prose, code, ...) for the first quarter of training, then the two-domain mixture, vs
the mixture throughout: val loss per domain and how much the experts specialise.

python -m jaxcourse.ch7 --config=configs/ch7_curriculum.py:cpu
Presets: smoke, cpu (each run 400 steps, like the ablation), gpu.
"""
from jaxcourse.lm.configs import moe_config


def get_config(preset: str = "cpu"):
    cfg = moe_config(preset)
    cfg.experiment = "ablation"
    cfg.ablation.variants = "base,domain_curriculum"
    cfg.ablation.per_domain = True
    if preset == "cpu":
        cfg.train.steps = 400
        cfg.train.eval_every = 400
    return cfg
