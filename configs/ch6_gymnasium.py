"""Chapter 6: the same PPO agent and jitted update on gymnasium's CartPole-v1, stepped in Python.

python -m jaxcourse.ch6 --config=configs/ch6_gymnasium.py:cpu
Presets: smoke (seconds), cpu (1.5e5 steps, one agent), gpu (5e5 steps). The rollout runs in
Python (one jitted policy call per step); rollout and update seconds are reported apart.
"""
from jaxcourse.rl.configs import ppo_config


def get_config(preset: str = "cpu"):
    cfg = ppo_config(preset)
    cfg.experiment = "gymnasium"
    cfg.data.name = "gymnasium"
    cfg.ppo.update(num_seeds=1, total_timesteps=150_000)
    if preset == "smoke":
        cfg.ppo.update(total_timesteps=4 * 32 * 2)
    elif preset == "gpu":
        cfg.ppo.update(total_timesteps=500_000)
    return cfg
