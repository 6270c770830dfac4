"""Chapter 3: sliding-window attention: window size vs validation perplexity and receptive field.

python -m jaxcourse.ch3 --config=configs/ch3_window.py:cpu
"""
from jaxcourse.ch3 import lm_base_config


def get_config(preset: str = "cpu"):
    cfg = lm_base_config(preset)
    cfg.experiment = "window"
    cfg.sweep = {"windows": (0, 16, 4)}
    cfg.model.context = 128
    t = cfg.train
    t.steps, t.batch_size, t.eval_every = 800, 8, 0
    if preset == "smoke":
        cfg.sweep.windows = (0, 3)
        cfg.model.context, t.steps = 16, 10
    elif preset == "gpu":
        cfg.sweep.windows = (0, 128, 32)
        cfg.model.context, t.steps, t.batch_size = 1024, 4000, 32
    return cfg
