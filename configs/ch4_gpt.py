"""Chapter 4: GPT pretraining on any text (default tiny Shakespeare, character level); val loss and tokens/s.

python -m jaxcourse.ch4 --config=configs/ch4_gpt.py:cpu --config.data.path=../shared/data/tinyshakespeare.txt
Presets: smoke (seconds), cpu (nanoGPT's CPU run: 4x128, context 64, 2000 iters), gpu (shakespeare-char 6x384,
context 256). GPT-2 124M: configs/ch4_gpt2.py.
"""
from jaxcourse.lm.configs import pretrain_config


def get_config(preset: str = "cpu"):
    return pretrain_config(preset)
