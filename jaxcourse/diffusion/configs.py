"""The base config of the chapter-8 experiments (configs/ch8_ddpm.py, configs/ch8_latent.py)."""
from __future__ import annotations

from jaxcourse.config import base_config


def diffusion_config(preset: str = "cpu"):
    """Settings shared by configs/ch8_*.py: pixel-space DDPM on digits (see ch8_ddpm.py)."""
    cfg = base_config()
    cfg.experiment = "ddpm"
    # U-Net (jaxcourse.models.unet.UNetConfig); image_size/channels must match the data.
    cfg.model = {"image_size": 8, "channels": 1, "width": 32, "width_mults": (1, 2),
                 "blocks": 1, "attn_sizes": (4,), "heads": 4, "num_classes": 10,
                 "dropout": 0.0, "groups": 8}
    cfg.diffusion = {"steps": 1000, "schedule": "cosine", "prediction": "eps",
                     "cond_dropout": 0.1,
                     "min_snr": 0.0}  # > 0: min-SNR-gamma loss weights (0 = plain MSE).
    cfg.sample = {
        "sampler": "ddim",        # the sampler behind the sample grid, its steps and eta.
        "steps": 50,
        "eta": 0.0,
        "guidance": 2.0,          # classifier-free guidance scale: 0 uncond, 1 cond.
        "table_guidance": 1.0,    # scale for the steps-vs-quality table (1: one call/step).
        "clip_x0": 1.0,           # clip x_0 estimates to [-1, 1]; 0 = off.
        "num": 0,                 # samples per table row; 0 = as many as held-out images.
        "batch": 0,               # sampling batch; 0 = all at once.
        "table_samplers": ("ddpm", "ddim"),
        "table_steps": (10, 20, 50, 100, 1000),
        "ode_steps": (10, 20, 50),  # probability-flow ODE (Heun) rows; () = none.
        "seed": 1,
        "checkpoint": "",         # experiment=sample: directory of a saved model.
    }
    # The judge is chapter 2's classifier with chapter 2's settings for the same preset;
    # steps / width > 0 and a non-empty arch replace chapter 2's values.
    cfg.judge = {"config": f"configs/ch2_digits.py:{preset}", "steps": 0, "width": 0,
                 "arch": ""}
    t = cfg.train
    t.steps = 3000
    t.batch_size = 128
    t.eval_every = 1000
    t.log_every = 100
    t.steps_per_call = 1  # one step per call on CPU: XLA runs convolutions in a scan ~25x slower.
    t.ema_decay = 0.999
    o = cfg.optimizer
    o.name = "adamw"
    o.lr = 2e-3
    o.schedule = "warmup_cosine"
    o.warmup_steps = 200
    o.weight_decay = 0.0
    o.clip_norm = 1.0
    if preset == "smoke":
        cfg.model.width = 8
        cfg.model.heads = 2
        cfg.diffusion.steps = 50
        cfg.sample.update(num=28, batch=28, table_steps=(5, 50), ode_steps=(), steps=5,
                          table_guidance=2.0)  # = guidance: table and grid share programs.
        cfg.judge.update(steps=10, arch="mlp")
        t.steps = 6
        t.batch_size = 16
        t.eval_every = 0
        t.log_every = 3
        t.ema_decay = 0.5
        o.warmup_steps = 2
    elif preset == "gpu":  # CIFAR-10 32x32, the DDPM paper's U-Net at reduced depth.
        cfg.data.name = "cifar10"
        cfg.model.update(image_size=32, channels=3, width=128, width_mults=(1, 2, 2, 2),
                         blocks=2, attn_sizes=(16,), dropout=0.1, groups=32)
        cfg.sample.update(num=10000, batch=2000, guidance=1.5)
        t.steps = 200_000
        t.eval_every = 10_000
        t.log_every = 500
        t.steps_per_call = 100
        t.precision = "bfloat16"
        t.ema_decay = 0.9999
        o.lr = 2e-4
        o.warmup_steps = 5000
        cfg.checkpoint.every = 10_000
    return cfg
