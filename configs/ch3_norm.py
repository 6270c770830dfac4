"""Chapter 3: pre-LN vs post-LN training stability at a high learning rate, with and without warmup.

python -m jaxcourse.ch3 --config=configs/ch3_norm.py:cpu
"""
from jaxcourse.lm.configs import char_gpt_config


def get_config(preset: str = "cpu"):
    cfg = char_gpt_config(preset)
    cfg.experiment = "norm"
    cfg.sweep = {"variants": ("pre", "post", "post_warmup"), "warmup_steps": 100}
    cfg.model.update(n_layer=6, norm="layernorm")
    t = cfg.train
    t.steps = 500
    t.eval_every = 0
    t.log_every = 10
    o = cfg.optimizer
    o.lr = 1e-2
    o.schedule = "constant"
    o.warmup_steps = 0
    o.clip_norm = 0.0
    if preset == "smoke":
        cfg.sweep.warmup_steps = 5
        cfg.model.n_layer = 2
        t.steps = 10
        t.log_every = 5
    elif preset == "gpu":
        cfg.model.n_layer = 12
        t.steps = 3000
        cfg.sweep.warmup_steps = 500
    return cfg
