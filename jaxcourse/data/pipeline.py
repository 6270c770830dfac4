"""grain pipelines whose element i is the batch for training step i.

Random access by step makes the data position part of the step counter, so a resumed run
sees exactly the batches a straight run would (the loop checkpoints the position).
"""
import sys

import grain
import numpy as np

from jaxcourse.errors import UserError


def batches(arrays: dict[str, np.ndarray], batch_size: int, seed: int) -> grain.MapDataset:
    """Shuffled, endlessly repeated batches; each epoch is a fresh permutation."""
    n = len(next(iter(arrays.values())))
    if batch_size > n:
        raise UserError(f"batch size {batch_size} is larger than the dataset ({n} examples)")
    indices = grain.MapDataset.range(n).shuffle(seed=seed).repeat().batch(
        batch_size, drop_remainder=True)
    return indices.map(lambda idx: {k: v[idx] for k, v in arrays.items()})


def eval_batches(arrays: dict[str, np.ndarray], batch_size: int) -> list[dict]:
    """Every example once, in order; the last batch may be smaller."""
    n = len(next(iter(arrays.values())))
    return [{k: v[i:i + batch_size] for k, v in arrays.items()} for i in range(0, n, batch_size)]


def lm_batches(tokens: np.ndarray, batch_size: int, context: int, seed: int) -> grain.MapDataset:
    """Random windows of `context + 1` tokens: {"inputs": [B, T], "targets": [B, T]}."""
    tokens = np.asarray(tokens)
    if len(tokens) <= context + 1:
        raise UserError(f"corpus of {len(tokens)} tokens is too short for context {context}")
    span = np.arange(context + 1)

    def window(step):
        offsets = np.random.default_rng([seed, step]).integers(
            0, len(tokens) - context - 1, size=batch_size)
        chunk = tokens[offsets[:, None] + span]
        return {"inputs": chunk[:, :-1], "targets": chunk[:, 1:]}

    return grain.MapDataset.range(sys.maxsize).map(window)
