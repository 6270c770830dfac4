"""Chapter 4: character-level GPT pretraining on the embedded stdlib corpus or any text file; val loss and tokens/s.

python -m jaxcourse.ch4 --config=configs/ch4_gpt.py:cpu     # the embedded stdlib corpus (vocab 96)
nanoGPT's shakespeare-char run, on tiny Shakespeare (any text file works; README: where it comes from):
python -m jaxcourse.ch4 --config=configs/ch4_gpt.py:cpu --config.data.path=tinyshakespeare.txt
Presets: smoke (seconds), cpu (nanoGPT's CPU run: 4x128, context 64, 2000 iters), gpu (shakespeare-char 6x384,
context 256). GPT-2 124M: configs/ch4_gpt2.py.
"""
from jaxcourse.lm.configs import pretrain_config


def get_config(preset: str = "cpu"):
    return pretrain_config(preset)
