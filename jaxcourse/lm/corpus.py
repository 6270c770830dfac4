"""A tokenized text corpus split into train and validation, and the batches drawn from it."""
from __future__ import annotations

import dataclasses

import numpy as np

from jaxcourse.data import pipeline, sources, tokenfile
from jaxcourse.data import tokenizers as toklib
from jaxcourse.errors import UserError


@dataclasses.dataclass
class Corpus:
    tokenizer: toklib.Tokenizer
    train: np.ndarray  # token ids, the first 1 - val_fraction of the text (a memmap for
    val: np.ndarray    # the held-out tail                                   token files)
    fertility: float   # tokens per word of the whole text


def load_corpus(data_cfg, *, tokenizer: str = "char", vocab_size: int = 512,
                max_chars: int = 0, val_fraction: float = 0.1, context: int = 0) -> Corpus:
    """Tokens of the configured text (`data` section: the embedded stdlib corpus or a file),
    its first `max_chars` characters (0: all); a tokenizer trained on it; the last
    `val_fraction` held out (nanoGPT's split: train = the first int(n * (1 - f)) tokens).
    Both splits must hold more than one window of `context` tokens.

    `data.name=tokens` with `data.path=DIR` reads token files made by `data.prepare`
    instead: memory-mapped, split and tokenized when they were made (max_chars and
    val_fraction do not apply), refused if made by another tokenizer than `tokenizer`."""
    if data_cfg.name == "tokens":
        return token_corpus(data_cfg.path, tokenizer, vocab_size, context)
    text = sources.load_text(data_cfg)[:max_chars or None]
    tok = toklib.make_tokenizer(tokenizer, text, vocab_size)
    ids = np.asarray(tok.encode(text), np.int32)
    n_train = int(len(ids) * (1.0 - val_fraction))
    if n_train <= context + 1 or len(ids) - n_train <= context + 1:
        raise UserError(f"corpus of {len(ids)} tokens is too short to split into train and "
                        f"validation windows of context {context}")
    return Corpus(tok, ids[:n_train], ids[n_train:], len(ids) / max(len(text.split()), 1))


def token_corpus(path, tokenizer: str | None = None, vocab_size: int = 0,
                 context: int = 0) -> Corpus:
    """A Corpus over the memory-mapped token files in folder `path` (nothing read yet)."""
    if not path:
        raise UserError("data.name='tokens' needs data.path=<folder made by "
                        "python -m jaxcourse.data.prepare>")
    tok, splits, meta = tokenfile.open_tokens(path, tokenizer, vocab_size)
    for name, ids in splits.items():
        if len(ids) <= context + 1:
            raise UserError(f"{path}/{name}.bin holds {len(ids)} tokens, too few for windows "
                            f"of context {context}")
    n = len(splits["train"]) + len(splits["val"])
    return Corpus(tok, splits["train"], splits["val"], n / max(int(meta.get("words", 0)), 1))


def eval_windows(tokens: np.ndarray, context: int, max_tokens: int, batch_size: int):
    """Non-overlapping windows from the start of `tokens`, so every model sees the same text."""
    n = min((len(tokens) - 1) // context, max(1, max_tokens // context))
    starts = np.arange(n) * context
    chunk = tokens[starts[:, None] + np.arange(context + 1)].astype(np.int32)
    return pipeline.eval_batches({"inputs": chunk[:, :-1], "targets": chunk[:, 1:]}, batch_size)


def random_batches(tokens: np.ndarray, n: int, batch_size: int, context: int, seed: int):
    """n batches of random windows (nanoGPT's get_batch), the same ones on every call and on
    every process (evaluation sees whole batches)."""
    data = pipeline.lm_batches(tokens, batch_size, context, seed, shard=pipeline.ALL_ROWS)
    return [data[i] for i in range(n)]
