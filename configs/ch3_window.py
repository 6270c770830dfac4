"""Chapter 3: sliding-window attention: window size vs validation perplexity and receptive field.

python -m jaxcourse.ch3 --config=configs/ch3_window.py:cpu
"""
from jaxcourse.lm.configs import char_gpt_config


def get_config(preset: str = "cpu"):
    cfg = char_gpt_config(preset)
    cfg.experiment = "window"
    cfg.sweep = {"windows": (0, 16, 4)}
    cfg.model.context = 128
    t = cfg.train
    t.steps = 800
    t.batch_size = 8
    t.eval_every = 0
    if preset == "smoke":
        cfg.sweep.windows = (0, 3)
        cfg.model.context = 16
        t.steps = 10
    elif preset == "gpu":
        cfg.sweep.windows = (0, 128, 32)
        cfg.model.context = 1024
        t.steps = 4000
        t.batch_size = 32
    return cfg
