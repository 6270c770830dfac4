"""Base configs of the chapter-6 experiments: PPO on gymnax (configs/ch6_ppo.py, ch6_stress.py,
ch6_gymnasium.py) and SFT + GRPO on a tiny GPT (configs/ch6_grpo.py, ch6_rlhf.py)."""
from __future__ import annotations

import dataclasses

import ml_collections

from jaxcourse import config
from jaxcourse.models.transformer import model_section
from jaxcourse.parallel.mesh import mesh_config
from jaxcourse.rl import lm_tasks
from jaxcourse.rl.grpo import GRPOConfig
from jaxcourse.rl.ppo import PPOConfig


def ppo_config(preset: str) -> ml_collections.ConfigDict:
    """purejaxrl's CartPole-v1 setting, trained for `num_seeds` seeds at once."""
    cfg = config.base_config()
    cfg.experiment = "ppo"
    cfg.data.name = "gymnax"
    fields = {f.name: f.default for f in dataclasses.fields(PPOConfig)}
    cfg.ppo = {**fields, "clip_eps": 0.2, "ent_coef": 0.01, "vf_coef": 0.5, "kl_coef": 0.0,
               "num_seeds": 8}
    o = cfg.optimizer
    o.name = "adam"
    o.lr = 2.5e-4
    o.schedule = "linear"
    o.min_lr_ratio = 0.0
    o.clip_norm = 0.5
    cfg.checkpoint.every = 244  # updates per compiled chunk (976 updates = 4 chunks)
    cfg.checkpoint.keep = 2
    if preset == "smoke":
        cfg.ppo.update(num_envs=4, num_steps=32, total_timesteps=4 * 32 * 6, update_epochs=2,
                       num_minibatches=2, hidden=32, num_seeds=2)
        cfg.checkpoint.every = 3
    elif preset == "gpu":
        cfg.ppo.update(num_seeds=256)
    return cfg


def grpo_config(preset: str) -> ml_collections.ConfigDict:
    """Noisy-teacher SFT of a tiny GPT with the shared loop, then GRPO on the exact reward."""
    cfg = config.base_config()
    cfg.experiment = "grpo"
    cfg.data.name = "addition"
    cfg.model = model_section(vocab_size=len(lm_tasks.VOCAB), context=8, n_layer=2, n_head=4,
                              d_model=64, pos="learned", norm="layernorm")
    cfg.task = {"p_correct": 0.3, "max_digit": 4}  # 25 prompts "a+b=" with a, b in 0..4
    # One device by default (a 2x64 GPT gains nothing from more); shard the SFT and GRPO
    # phases with e.g. --config.mesh.devices=0 --config.mesh.fsdp=-1.
    cfg.mesh = mesh_config(devices=1)
    fields = {f.name: f.default for f in dataclasses.fields(GRPOConfig)}
    cfg.grpo = {**fields, "steps": 60, "eval_samples": 8, "log_every": 5}
    t = cfg.train  # the SFT phase (shared loop)
    t.steps = 400
    t.batch_size = 64
    t.eval_every = 0
    t.log_every = 100
    t.steps_per_call = 50
    o = cfg.optimizer
    o.name = "adamw"
    o.lr = 3e-3
    o.schedule = "warmup_cosine"
    o.warmup_steps = 20
    o.clip_norm = 1.0
    cfg.rl_optimizer = ml_collections.ConfigDict(o.to_dict())
    cfg.rl_optimizer.update(lr=1e-3, schedule="constant", warmup_steps=0)
    if preset == "smoke":
        cfg.model.update(n_layer=1, n_head=2, d_model=32)
        # 9 prompts a+b (a, b in 0..2): after 20 SFT steps some groups still score unevenly,
        # so GRPO's advantages are not all 0 (at 0..4 every smoke group was all-wrong).
        cfg.task.max_digit = 2
        t.steps = 20
        t.batch_size = 16
        t.steps_per_call = 10
        cfg.grpo.update(steps=3, prompts_per_step=4, group_size=4, eval_samples=2, log_every=1)
    elif preset == "gpu":  # all 100 sums of two digits
        cfg.task.max_digit = 9
        t.steps = 3000
        cfg.grpo.update(steps=200, prompts_per_step=64, group_size=16)
    return cfg
