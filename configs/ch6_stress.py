"""Chapter 6: PPO hyper-parameter stress test: entropy coef x clip range x KL coef, one vmapped grid.

python -m jaxcourse.ch6 --config=configs/ch6_stress.py:cpu
Presets: smoke (seconds), cpu (3 x 3 x 2 grid x 2 seeds = 36 agents, 2.5e5 steps each),
gpu (8 seeds, 5e5 steps). Writes stress.png (one heat map per KL coef) and stress.json.
"""
from jaxcourse.ch6 import stress_config


def get_config(preset: str = "cpu"):
    return stress_config(preset)
