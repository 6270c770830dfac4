"""A rule-based reward task small enough for RL on a CPU: single-digit addition.

Prompt "a+b=" (4 tokens), completion: the digits of a+b then "." (end). The reward is 1
for the exact answer followed by ".", else 0: a verifiable reward, no model needed.

The supervised start ("SFT") comes from a *noisy teacher*: its answer is right with
probability `p_correct` and a uniformly random number otherwise. A model fit to it samples
the right answer ~p_correct of the time while ranking it first, the situation GRPO is
for: the model already knows, and RL turns pass@k into pass@1.
"""
import dataclasses

import jax.numpy as jnp
import numpy as np

VOCAB = "0123456789+=."
EOS = VOCAB.index(".")
PROMPT_LEN = 4       # "a+b="
MAX_ANSWER = 3       # two digits and "."


def encode(text: str) -> list[int]:
    return [VOCAB.index(c) for c in text]


def decode(ids) -> str:
    return "".join(VOCAB[int(i)] for i in ids)


@dataclasses.dataclass(frozen=True)
class AdditionTask:
    p_correct: float = 0.3   # the noisy teacher's accuracy (SFT data)
    max_digit: int = 9
    eos_id = EOS             # class constant, not a field

    @property
    def num_prompts(self) -> int:
        return (self.max_digit + 1) ** 2

    def operands(self, idx):
        """Prompt index -> (a, b), for numpy or jax integer arrays."""
        return idx // (self.max_digit + 1), idx % (self.max_digit + 1)

    def prompts(self, idx_P):
        """[P] prompt indices -> [P, 4] tokens of "a+b=" (jax or numpy)."""
        a, b = self.operands(idx_P)
        xp = jnp if isinstance(idx_P, jnp.ndarray) else np
        plus, eq = VOCAB.index("+"), VOCAB.index("=")
        return xp.stack([a, xp.full_like(a, plus), b, xp.full_like(a, eq)], -1).astype(xp.int32)

    def answer_tokens(self, n_P):
        """The completion for answer n: [d1, d2, "."] or [d, ".", "."] (padding is EOS)."""
        xp = jnp if isinstance(n_P, jnp.ndarray) else np
        two = n_P >= 10
        first = xp.where(two, n_P // 10, n_P)
        second = xp.where(two, n_P % 10, EOS)
        return xp.stack([first, second, xp.full_like(n_P, EOS)], -1).astype(xp.int32)

    def reward(self, idx_B, completion_BxC):
        """1.0 where the completion spells a+b then ".", else 0.0 (jnp)."""
        a, b = self.operands(idx_B)
        want = self.answer_tokens(a + b)
        n_tok = jnp.where(a + b >= 10, 3, 2)  # answer digits plus the "."
        pos = jnp.arange(completion_BxC.shape[1])
        ok = (completion_BxC == want) | (pos >= n_tok[:, None])
        return ok.all(-1).astype(jnp.float32)

    def sft_batch(self, rng: np.random.Generator, batch_size: int) -> dict:
        """Noisy-teacher sequences for next-token training, loss only on the completion."""
        idx = rng.integers(0, self.num_prompts, batch_size)
        a, b = self.operands(idx)
        wrong = rng.integers(0, 2 * self.max_digit + 1, batch_size)
        answer = np.where(rng.random(batch_size) < self.p_correct, a + b, wrong)
        seq = np.concatenate([self.prompts(idx), self.answer_tokens(answer)], -1)
        mask = np.zeros_like(seq[:, 1:], dtype=np.float32)
        n_tok = np.where(answer >= 10, 3, 2)
        for j in range(MAX_ANSWER):  # predict completion token j from position PROMPT_LEN-1+j
            mask[:, PROMPT_LEN - 1 + j] = j < n_tok
        return {"inputs": seq[:, :-1], "targets": seq[:, 1:], "mask": mask}


class SFTData:
    """Element i is SFT batch i (deterministic in i), the shared loop's data contract."""

    def __init__(self, task: AdditionTask, batch_size: int, seed: int):
        self.task, self.batch_size, self.seed = task, batch_size, seed

    def __len__(self):
        return 2 ** 31

    def __getitem__(self, i: int) -> dict:
        return self.task.sft_batch(np.random.default_rng([self.seed, int(i)]), self.batch_size)
