"""Chapter 4: tokenizer fertility (tokens per word) of characters, scratch BPE and HF BPE on a corpus.

python -m jaxcourse.ch4 --config=configs/ch4_tokenizers.py:cpu --config.data.path=tinyshakespeare.txt
"""
from jaxcourse.lm.configs import pretrain_config


def get_config(preset: str = "cpu"):
    cfg = pretrain_config(preset)
    cfg.experiment = "tokenizers"
    cfg.tokenizers = {"names": ("char", "bpe_scratch", "bpe"), "vocab_sizes": (512, 2048)}
    if preset == "smoke":
        cfg.tokenizers.vocab_sizes = (300,)
    return cfg
