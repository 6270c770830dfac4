"""A tokenized text corpus split into train and validation, and the batches drawn from it."""
from __future__ import annotations

import dataclasses

import numpy as np

from jaxcourse.data import pipeline, sources
from jaxcourse.data import tokenizers as toklib
from jaxcourse.errors import UserError


@dataclasses.dataclass
class Corpus:
    tokenizer: toklib.Tokenizer
    train: np.ndarray  # int32 token ids, the first 1 - val_fraction of the text
    val: np.ndarray    # the held-out tail
    fertility: float   # tokens per word of the whole text


def load_corpus(data_cfg, *, tokenizer: str = "char", vocab_size: int = 512,
                max_chars: int = 0, val_fraction: float = 0.1, context: int = 0) -> Corpus:
    """Tokens of the configured text (`data` section: the embedded stdlib corpus or a file),
    its first `max_chars` characters (0: all); a tokenizer trained on it; the last
    `val_fraction` held out (nanoGPT's split: train = the first int(n * (1 - f)) tokens).
    Both splits must hold more than one window of `context` tokens."""
    text = sources.load_text(data_cfg)[:max_chars or None]
    tok = toklib.make_tokenizer(tokenizer, text, vocab_size)
    ids = np.asarray(tok.encode(text), np.int32)
    n_train = int(len(ids) * (1.0 - val_fraction))
    if n_train <= context + 1 or len(ids) - n_train <= context + 1:
        raise UserError(f"corpus of {len(ids)} tokens is too short to split into train and "
                        f"validation windows of context {context}")
    return Corpus(tok, ids[:n_train], ids[n_train:], len(ids) / max(len(text.split()), 1))


def eval_windows(tokens: np.ndarray, context: int, max_tokens: int, batch_size: int):
    """Non-overlapping windows from the start of `tokens`, so every model sees the same text."""
    n = min((len(tokens) - 1) // context, max(1, max_tokens // context))
    starts = np.arange(n) * context
    chunk = tokens[starts[:, None] + np.arange(context + 1)]
    return pipeline.eval_batches({"inputs": chunk[:, :-1], "targets": chunk[:, 1:]}, batch_size)


def random_batches(tokens: np.ndarray, n: int, batch_size: int, context: int, seed: int):
    """n batches of random windows (nanoGPT's get_batch), the same ones on every call."""
    data = pipeline.lm_batches(tokens, batch_size, context, seed)
    return [data[i] for i in range(n)]
