"""Chapter 3: pre-LN vs post-LN training stability at a high learning rate, with and without warmup.

python -m jaxcourse.ch3 --config=configs/ch3_norm.py:cpu
"""
from jaxcourse.ch3 import lm_base_config


def get_config(preset: str = "cpu"):
    cfg = lm_base_config(preset)
    cfg.experiment = "norm"
    cfg.sweep = {"variants": ("pre", "post", "post_warmup"), "warmup_steps": 100}
    cfg.model.update(n_layer=6, norm="layernorm")
    t, o = cfg.train, cfg.optimizer
    t.steps, t.eval_every, t.log_every = 500, 0, 10
    o.lr, o.schedule, o.warmup_steps, o.clip_norm = 1e-2, "constant", 0, 0.0
    if preset == "smoke":
        cfg.sweep.warmup_steps = 5
        cfg.model.n_layer = 2
        t.steps, t.log_every = 10, 5
    elif preset == "gpu":
        cfg.model.n_layer = 12
        t.steps = 3000
        cfg.sweep.warmup_steps = 500
    return cfg
