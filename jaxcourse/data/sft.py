"""A procedurally generated instruction set for supervised fine-tuning (SFT).

Each example is a prompt naming a string task and a word, and the answer ending in a newline:

    prompt "reverse: crown\n"   answer "nworc\n"
    prompt "upper: crown\n"     answer "CROWN\n"

Words come from the pretraining text (so a character model knows their letters); a word's
hash puts it in the train or the held-out split, so evaluation prompts use words the
fine-tuned model never saw. `encode_examples` right-pads to the context and builds a loss
mask that is 1 exactly on the positions whose *target* is an answer token: the model is
trained to answer, not to predict the prompt (Ouyang et al. 2022, InstructGPT's SFT).

Exact-match accuracy (`answer_accuracy`) is measured teacher-forced: an example counts as
correct iff the argmax at every answer position equals the answer token. This is exactly
"greedy decoding reproduces the answer and then stops at the newline", in one batched
forward pass instead of a token-by-token loop.
"""
from __future__ import annotations

import re
import zlib
from typing import Callable, Sequence

import numpy as np

from jaxcourse.errors import UserError

TASKS: dict[str, Callable[[str], str]] = {
    "upper": str.upper,
    "reverse": lambda w: w[::-1],
    "sort": lambda w: "".join(sorted(w)),
    "double": lambda w: w + w,
    "first": lambda w: w[0],
}
FALLBACK_WORDS = ("crown king queen lord sword night heart blood death grace honour power "
                  "peace water heaven friend father mother brother sister tongue speak noble "
                  "gentle fortune beauty reason spirit throne battle prince mercy ").split()


def words_from_text(text: str, min_len: int = 3, max_len: int = 7) -> list[str]:
    """Distinct lowercase alphabetic words of the text, in first-seen order."""
    seen = dict.fromkeys(w for w in re.findall(r"\b[a-z]+\b", text)
                         if min_len <= len(w) <= max_len)
    return list(seen) or list(FALLBACK_WORDS)


def usable_words(words: Sequence[str], tasks: Sequence[str], tok, context: int) -> list[str]:
    """The words whose examples the tokenizer can encode (a character vocabulary may lack,
    say, the capital of a letter) and that fit the context, for every task."""
    check_tasks(tasks)
    out = []
    for w in words:
        try:
            if all(len(tok.encode(f"{t}: {w}\n{TASKS[t](w)}\n")) - 1 <= context for t in tasks):
                out.append(w)
        except UserError:
            continue
    if not out:
        raise UserError(f"no word gives examples of tasks {list(tasks)} that the tokenizer "
                        f"encodes within the context {context}")
    return out


def split_words(words: Sequence[str], heldout_fraction: float) -> tuple[list[str], list[str]]:
    """Deterministic split by CRC32 of the word: independent of list order and process."""
    cut = int(heldout_fraction * 1000)
    train = [w for w in words if zlib.crc32(w.encode()) % 1000 >= cut]
    held = [w for w in words if zlib.crc32(w.encode()) % 1000 < cut]
    if not train or not held:
        raise UserError(f"cannot split {len(words)} words into train and held-out sets "
                        f"with heldout_fraction={heldout_fraction}")
    return train, held


def check_tasks(tasks: Sequence[str]) -> None:
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise UserError(f"unknown SFT task(s) {unknown or '(none given)'}; choose from "
                        f"{', '.join(TASKS)}")


def make_examples(words: Sequence[str], tasks: Sequence[str], n: int,
                  seed: int) -> list[tuple[str, str]]:
    """n (prompt, answer) pairs, tasks and words drawn uniformly."""
    check_tasks(tasks)
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        task, word = tasks[rng.integers(len(tasks))], words[rng.integers(len(words))]
        out.append((f"{task}: {word}\n", TASKS[task](word) + "\n"))
    return out


def few_shot(examples: Sequence[tuple[str, str]], shots: Sequence[tuple[str, str]],
             context: int, tok, max_shots: int) -> list[tuple[str, str]]:
    """Prepends up to max_shots solved examples of the same task to each prompt, as many
    as fit the context (in-context learning, Brown et al. 2020)."""
    out = []
    for prompt, answer in examples:
        task = prompt.split(":")[0]
        prefix = ""
        same_task = [s for s in shots if s[0].split(":")[0] == task][:max_shots]
        for p, a in same_task:
            candidate = prefix + p + a
            if len(tok.encode(candidate + prompt + answer)) > context + 1:
                break
            prefix = candidate
        out.append((prefix + prompt, answer))
    return out


def encode_examples(examples: Sequence[tuple[str, str]], tok, context: int,
                    pad_id: int = 0) -> dict[str, np.ndarray]:
    """{"inputs", "targets": int32 [N, context], "mask": float32 [N, context]}.

    Position t predicts token t+1 of prompt+answer; mask[t] = 1 iff that token belongs to
    the answer. Padding positions have mask 0, so their pad tokens never reach the loss.
    """
    n = len(examples)
    inputs = np.full((n, context), pad_id, np.int32)
    targets = np.full((n, context), pad_id, np.int32)
    mask = np.zeros((n, context), np.float32)
    for i, (prompt, answer) in enumerate(examples):
        p, a = tok.encode(prompt), tok.encode(answer)
        if len(p) > context:
            raise UserError(f"prompt of {len(p)} tokens is longer than the context {context}: "
                            f"{prompt[:40]!r}...")
        if not a:
            raise UserError(f"empty answer for prompt {prompt!r}")
        seq = p + a
        if len(seq) - 1 > context:
            raise UserError(f"prompt + answer of {len(seq)} tokens does not fit the context "
                            f"{context} (+1): {prompt[:40]!r}...")
        inputs[i, :len(seq) - 1] = seq[:-1]
        targets[i, :len(seq) - 1] = seq[1:]
        mask[i, len(p) - 1:len(seq) - 1] = 1.0
    return {"inputs": inputs, "targets": targets, "mask": mask}


def answer_accuracy(logits_NxTxV: np.ndarray, batch: dict) -> np.ndarray:
    """Per-example exact match [N] (1.0 = every answer token is the argmax)."""
    wrong = (np.argmax(logits_NxTxV, -1) != batch["targets"]) & (batch["mask"] > 0)
    return (~wrong.any(axis=1)).astype(np.float32)


def build_sets(text: str, tasks: Sequence[str], tok, context: int, *, n_train: int,
               n_eval: int, heldout_fraction: float, shots: int, seed: int) -> dict:
    """Encoded train set, held-out set (zero-shot and few-shot prompts) and task names."""
    words = usable_words(words_from_text(text), tasks, tok, context)
    train_words, held_words = split_words(words, heldout_fraction)
    train_ex = make_examples(train_words, tasks, n_train, seed)
    held_ex = make_examples(held_words, tasks, n_eval, seed + 1)
    solved = make_examples(train_words, tasks, 8 * len(tasks), seed + 2)
    return {"train": encode_examples(train_ex, tok, context),
            "heldout": encode_examples(held_ex, tok, context),
            "few_shot": encode_examples(few_shot(held_ex, solved, context, tok, shots), tok,
                                        context),
            "tasks": np.array([p.split(":")[0] for p, _ in held_ex]), "examples": held_ex}


def exact_match(logits_fn: Callable, arrays: dict, batch_size: int) -> np.ndarray:
    """Per-example exact match [N] of `logits_fn(inputs [B, T]) -> logits [B, T, V]`.

    Batches are all `batch_size` rows (the last one wraps around) so one compiled shape
    serves the whole set.
    """
    n = len(arrays["inputs"])
    out = []
    for i in range(0, n, batch_size):
        idx = np.arange(i, i + batch_size) % n
        batch = {k: v[idx] for k, v in arrays.items()}
        out.append(answer_accuracy(np.asarray(logits_fn(batch["inputs"])), batch))
    return np.concatenate(out)[:n]
