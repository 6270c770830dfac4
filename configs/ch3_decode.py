"""Chapter 3: KV-cache decoding vs recomputing the prefix every step (tokens per second).

python -m jaxcourse.ch3 --config=configs/ch3_decode.py:cpu
"""
from jaxcourse.lm.configs import char_gpt_config


def get_config(preset: str = "cpu"):
    cfg = char_gpt_config(preset)
    cfg.experiment = "decode"
    cfg.model.update(context=512, vocab_size=96)
    cfg.decode.update(prompt_len=16, new_tokens=(32, 128, 256), repeats=5)
    if preset == "smoke":
        cfg.model.context = 16
        cfg.decode.update(prompt_len=4, new_tokens=(8,), repeats=1)
    elif preset == "gpu":
        cfg.model.context = 2048
        cfg.decode.update(batch_size=8, prompt_len=64, new_tokens=(128, 512, 1984), repeats=3)
    return cfg
