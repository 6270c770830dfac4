"""Chapter 10: every token mixer (and an attention,mamba hybrid) as a char LM; decode cost vs context.

python -m jaxcourse.ch10 --config=configs/ch10_mixers.py:cpu
Any text file: python -m jaxcourse.ch10 --config.data.path=../shared/data/tinyshakespeare.txt
Some models: --config.lab.models=attention,mamba,hybrid; another hybrid:
--config.lab.hybrid_pattern=attention,mamba2,mamba2
Presets: smoke (seconds), cpu (minutes on 2 cores: 4x128, 400 steps each), gpu.
"""
from jaxcourse.ssm_lab.configs import mixers_config


def get_config(preset: str = "cpu"):
    return mixers_config(preset)
