"""Chapter 6: the same PPO agent and jitted update on gymnasium's CartPole-v1, stepped in Python.

python -m jaxcourse.ch6 --config=configs/ch6_gymnasium.py:cpu
Presets: smoke (seconds), cpu (1.5e5 steps, one agent), gpu (5e5 steps). The rollout runs in
Python (one jitted policy call per step); rollout and update seconds are reported apart.
"""
from jaxcourse.ch6 import gymnasium_config


def get_config(preset: str = "cpu"):
    return gymnasium_config(preset)
