"""Chapter 3: validation perplexity vs context length (same tokens per step for every context).

python -m jaxcourse.ch3 --config=configs/ch3_context.py:cpu
"""
from jaxcourse.lm.configs import char_gpt_config


def get_config(preset: str = "cpu"):
    cfg = char_gpt_config(preset)
    cfg.experiment = "context"
    cfg.sweep = {"contexts": (8, 16, 32, 64, 128), "tokens_per_step": 1024}
    cfg.model.context = max(cfg.sweep.contexts)
    cfg.train.steps = 600
    cfg.train.eval_every = 0
    if preset == "smoke":
        cfg.sweep.update(contexts=(4, 16), tokens_per_step=64)
        cfg.model.context = 16
        cfg.train.steps = 10
    elif preset == "gpu":
        cfg.sweep.update(contexts=(16, 64, 256, 1024), tokens_per_step=65536)
        cfg.model.context = 1024
        cfg.train.steps = 4000
    return cfg
