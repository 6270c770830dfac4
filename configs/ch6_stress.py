"""Chapter 6: PPO hyper-parameter stress test: entropy coef x clip range x KL coef, one vmapped grid.

python -m jaxcourse.ch6 --config=configs/ch6_stress.py:cpu
Presets: smoke (seconds), cpu (3 x 3 x 2 grid x 2 seeds = 36 agents, 2.5e5 steps each),
gpu (8 seeds, 5e5 steps). Writes stress.png (one heat map per KL coef) and stress.json.
"""
from jaxcourse.rl.configs import ppo_config


def get_config(preset: str = "cpu"):
    cfg = ppo_config(preset)
    cfg.experiment = "stress"
    cfg.ppo.num_seeds = 2
    cfg.stress = {"ent_coef": (0.0, 0.01, 0.1), "clip_eps": (0.02, 0.2, 1000.0),
                  "kl_coef": (0.0, 3.0)}
    cfg.ppo.total_timesteps = 250_000
    cfg.checkpoint.every = 0
    if preset == "smoke":
        cfg.stress = {"ent_coef": (0.0, 0.1), "clip_eps": (0.2,), "kl_coef": (0.0, 1.0)}
        cfg.ppo.update(total_timesteps=4 * 32 * 3, num_seeds=1)
    elif preset == "gpu":
        cfg.ppo.update(total_timesteps=500_000, num_seeds=8)
    return cfg
