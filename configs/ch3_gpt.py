"""Chapter 3: a character-level GPT on the stdlib corpus; samples, attention maps, KV-cache speed.

python -m jaxcourse.ch3 --config=configs/ch3_gpt.py:cpu
Any text file: python -m jaxcourse.ch3 --config.data.path=tinyshakespeare.txt
"""
from jaxcourse.lm.configs import char_gpt_config


def get_config(preset: str = "cpu"):
    cfg = char_gpt_config(preset)
    cfg.experiment = "train"
    if preset == "cpu":
        cfg.decode.new_tokens = (16, 32, 56)
    elif preset == "smoke":
        cfg.decode.new_tokens = ()  # The decode experiment's smoke run times decoding.
    return cfg
