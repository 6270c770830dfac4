"""Chapter 10: multi-query associative recall per mixer: which fixed-size states remember?

python -m jaxcourse.ch10 --config=configs/ch10_recall.py:cpu
Harder: --config.recall.pairs=32 --config.recall.queries=16 (model.context >= 95)
Presets: smoke (seconds), cpu (minutes on 2 cores: 2x64 models, 800 steps each; only RWKV-6
learns it at that budget, see chapters/ch10_emerging.md), gpu (64 pairs, 5,000 steps).
"""
from jaxcourse.ssm_lab.configs import recall_config


def get_config(preset: str = "cpu"):
    return recall_config(preset)
