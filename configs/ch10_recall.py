"""Chapter 10: multi-query associative recall per mixer: which fixed-size states remember?

python -m jaxcourse.ch10 --config=configs/ch10_recall.py:cpu
Harder: --config.recall.pairs=16 --config.recall.queries=16 --config.recall.n_keys=64
--config.recall.n_values=64 (sequences of 63 tokens fill model.context 64)
Presets: smoke (seconds), cpu (2x64 models, 8 pairs, 2,000 steps of batch 128 each: about
18 minutes on 2 cores, see chapters/ch10_emerging.md), gpu (64 pairs, 5,000 steps).
"""
from jaxcourse.ssm_lab.configs import recall_config


def get_config(preset: str = "cpu"):
    return recall_config(preset)
