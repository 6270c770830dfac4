"""grain pipelines whose element i is the batch for training step i.

Random access by step makes the data position part of the step counter, so a resumed run
sees exactly the batches a straight run would (the loop checkpoints the position).

Each process materialises only its own rows. The index side of a batch (a seeded
permutation, or random window offsets) is a few integers that every process computes
alike; the rows themselves are gathered only for this process's shard, rows
`[i * B/n, (i+1) * B/n)` of the global batch for shard i of n (`grain.sharding`:
`ShardByJaxProcess` by default, so on one process that is every row). A multi-process run
therefore draws exactly the rows a single process would, and
`parallel.batch.put_global` stitches the shards into one global array.
"""
import sys

import grain
import numpy as np

from jaxcourse.errors import UserError

ShardOptions = grain.sharding.ShardOptions
ALL_ROWS = grain.sharding.NoSharding()


def process_shard() -> ShardOptions:
    """This process's shard: jax.process_index() of jax.process_count()."""
    return grain.sharding.ShardByJaxProcess(drop_remainder=True)


def local_rows(batch_size: int, shard: ShardOptions | None = None) -> slice:
    """The rows of a global batch that shard `shard` (default: this process) materialises."""
    shard = process_shard() if shard is None else shard
    if batch_size % shard.shard_count:
        raise UserError(f"batch size {batch_size} cannot be split evenly over "
                        f"{shard.shard_count} processes")
    n = batch_size // shard.shard_count
    return slice(shard.shard_index * n, (shard.shard_index + 1) * n)


def batches(arrays, batch_size: int, seed: int,
            shard: ShardOptions | None = None) -> grain.MapDataset:
    """Shuffled, endlessly repeated batches; each epoch is a fresh permutation.

    `arrays` maps names to anything indexable by an integer array with a length: numpy
    arrays, memmaps, or lazy random-access columns such as `sources.load_tfds` returns.
    Only this shard's rows of each batch are read."""
    n = len(next(iter(arrays.values())))
    if batch_size > n:
        raise UserError(f"batch size {batch_size} is larger than the dataset ({n} examples)")
    rows = local_rows(batch_size, shard)
    indices = grain.MapDataset.range(n).shuffle(seed=seed).repeat().batch(
        batch_size, drop_remainder=True)
    return indices.map(lambda idx: {k: np.asarray(v[idx[rows]]) for k, v in arrays.items()})


def eval_batches(arrays, batch_size: int) -> list[dict]:
    """Every example once, in order; the last batch may be smaller (every process: all rows)."""
    n = len(next(iter(arrays.values())))
    return [{k: np.asarray(v[i:i + batch_size]) for k, v in arrays.items()}
            for i in range(0, n, batch_size)]


def lm_batches(tokens, batch_size: int, context: int, seed: int,
               shard: ShardOptions | None = None) -> grain.MapDataset:
    """Random windows of `context + 1` tokens: {"inputs": [B, T], "targets": [B, T]} (int32).

    `tokens` may be a memory-mapped token file (`data.tokenfile`): only the windows this
    shard needs are read from it, never the whole file."""
    if not isinstance(tokens, np.ndarray):  # np.memmap is an ndarray: no copy into RAM.
        tokens = np.asarray(tokens)
    if len(tokens) <= context + 1:
        raise UserError(f"corpus of {len(tokens)} tokens is too short for context {context}")
    rows = local_rows(batch_size, shard)
    span = np.arange(context + 1)

    def window(step):
        # Offsets for the whole batch (every shard draws the same ones), rows for this shard.
        offsets = np.random.default_rng([seed, step]).integers(
            0, len(tokens) - context - 1, size=batch_size)[rows]
        chunk = tokens[offsets[:, None] + span].astype(np.int32)
        return {"inputs": chunk[:, :-1], "targets": chunk[:, 1:]}

    return grain.MapDataset.range(sys.maxsize).map(window)


def mixture_batches(parts, batch_size: int, context: int, seed: int,
                    pure_steps: int = 0) -> grain.MapDataset:
    """`lm_batches` over the concatenated corpora `parts`, except that each of the first
    `pure_steps` batches comes from one part alone, the parts in turn (a domain curriculum:
    chapter 7 routes single-domain batches first)."""
    mixed = lm_batches(np.concatenate(parts), batch_size, context, seed)
    pure = [lm_batches(p, batch_size, context, seed) for p in parts] if pure_steps else []

    def pick(step):
        return pure[step % len(pure)][step] if step < pure_steps else mixed[step]

    return grain.MapDataset.range(sys.maxsize).map(pick)
