"""The base config of the chapter-9 experiments (configs/ch9_*.py): the small GPT on a mesh.

The model is `jaxcourse.lm.configs.small_gpt` (4 x 128, context 64) with the transformer's
defaults (RoPE, RMSNorm, f32 matmuls) and its block stack as one nn.scan, so its layers can
form pipeline stages. Each config file adds its lab's settings.
"""
from __future__ import annotations

import ml_collections

from jaxcourse import config
from jaxcourse.lm.configs import small_gpt
from jaxcourse.parallel.mesh import mesh_config


def mesh_gpt_config(preset: str, experiment: str) -> ml_collections.ConfigDict:
    cfg = config.base_config()
    cfg.experiment = experiment
    cfg.data.name = "stdlib"
    cfg.model = small_gpt(scan_layers=True)
    cfg.parallel = {
        "layouts": "single,dp,fsdp,tp,fsdp_tp,pp",
        "microbatches": 4,
        "max_chars": 300_000,
        "vocab_multiple": 64,  # the char vocabulary is padded so tensor=4 can split it.
    }
    cfg.mesh = mesh_config(data=-1)  # `train` runs on it; `layouts` sets one per layout.
    t = cfg.train
    t.steps = 40
    t.batch_size = 16
    t.log_every = 1
    t.eval_every = 0
    t.steps_per_call = 10
    o = cfg.optimizer
    o.name = "adamw"
    o.lr = 1e-3
    o.schedule = "warmup_cosine"
    o.warmup_steps = 5
    o.clip_norm = 1.0
    if preset == "smoke":
        cfg.model.update(context=16, d_model=32)
        cfg.parallel.max_chars = 20_000
        t.steps = 4
        t.batch_size = 8
        t.steps_per_call = 1
    elif preset == "gpu":
        cfg.model.update(context=1024, n_layer=12, n_head=12, d_model=768)
        cfg.parallel.update(max_chars=0, microbatches=8)
        t.steps = 200
        t.batch_size = 64
        t.steps_per_call = 10
    return cfg
