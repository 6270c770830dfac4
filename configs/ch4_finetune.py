"""Chapter 4: teach a pretrained GPT string tasks: few-shot prompting vs full SFT vs LoRA on held-out words.

python -m jaxcourse.ch4 --config=configs/ch4_finetune.py:cpu --config.data.path=../shared/data/tinyshakespeare.txt
Reuse a pretrained model: --config.finetune.base=runs/ch4/gpt-cpu (otherwise one is pretrained first).
"""
from jaxcourse.ch4 import finetune_config


def get_config(preset: str = "cpu"):
    return finetune_config(preset)
