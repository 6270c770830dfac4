"""Multi-query associative recall (MQAR, Arora et al. 2023 "Zoology"), generated in code.

A sequence is `pairs` key-value pairs, then `queries` distinct keys of them, each followed by
its value:

    k1 v1 k2 v2 ... kP vP  q1 a1 q2 a2 ... qQ aQ        (a_i = the value paired with q_i)

Keys are tokens 1..n_keys (distinct within a sequence), values n_keys+1..n_keys+n_values.
As a next-token task the inputs are the sequence without its last token, the targets it
shifted by one, and the mask keeps only the answers: a model scores by recalling which value
followed a key it saw earlier, which attention does by looking it up and a fixed-size state
must have kept. Chance accuracy is 1 / n_values.
"""
from __future__ import annotations

import sys

import grain
import numpy as np

from jaxcourse.errors import UserError


def check(n_keys: int, n_values: int, pairs: int, queries: int) -> None:
    if min(n_keys, n_values, pairs, queries) < 1:
        raise UserError("recall: n_keys, n_values, pairs and queries must be >= 1")
    if pairs > n_keys or queries > pairs:
        raise UserError(f"recall: needs queries ({queries}) <= pairs ({pairs}) <= n_keys "
                        f"({n_keys})")


def vocab_size(n_keys: int, n_values: int) -> int:
    return 1 + n_keys + n_values


def seq_len(pairs: int, queries: int) -> int:
    """Length of the inputs (the sequence minus its last token)."""
    return 2 * (pairs + queries) - 1


def recall_batch(rng: np.random.Generator, batch_size: int, *, n_keys: int, n_values: int,
                 pairs: int, queries: int) -> dict:
    """{"inputs", "targets", "mask": [B, 2 (pairs + queries) - 1]} int32 / float32."""
    check(n_keys, n_values, pairs, queries)
    keys_BxP = np.argsort(rng.random((batch_size, n_keys)), axis=1)[:, :pairs] + 1
    values_BxP = rng.integers(0, n_values, (batch_size, pairs)) + n_keys + 1
    pick_BxQ = np.argsort(rng.random((batch_size, pairs)), axis=1)[:, :queries]
    q_BxQ = np.take_along_axis(keys_BxP, pick_BxQ, 1)
    a_BxQ = np.take_along_axis(values_BxP, pick_BxQ, 1)
    context = np.stack([keys_BxP, values_BxP], -1).reshape(batch_size, -1)
    asked = np.stack([q_BxQ, a_BxQ], -1).reshape(batch_size, -1)
    seq = np.concatenate([context, asked], 1).astype(np.int32)
    mask = np.zeros(seq.shape, np.float32)
    mask[:, 2 * pairs + 1::2] = 1.0  # the answers
    return {"inputs": seq[:, :-1], "targets": seq[:, 1:], "mask": mask[:, 1:]}


def recall_batches(batch_size: int, seed: int, **task) -> grain.MapDataset:
    """Element i is step i's batch (seeded by (seed, i)), as the loop expects."""
    check(task["n_keys"], task["n_values"], task["pairs"], task["queries"])
    return grain.MapDataset.range(sys.maxsize).map(
        lambda step: recall_batch(np.random.default_rng([seed, step]), batch_size, **task))
