"""A reward model from preference pairs (Bradley-Terry), and a value model for PPO-LM.

Both reuse the chapter's GPT as the trunk and read a scalar from its output: a linear map
of the vocabulary logits at a position (the LM head's output as features), so no second
transformer is written. The reward model scores a whole sequence at its last position; the
value model scores every position.

Bradley-Terry (as in InstructGPT, Ouyang et al. 2022): P(chosen > rejected) =
sigmoid(r(chosen) - r(rejected)); the loss is -log of it.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxcourse.models.transformer import GPT, GPTConfig
from jaxcourse.train import Task


class ScalarHead(nn.Module):
    """tokens [B, S] -> scalars [B, S] (one per position)."""
    cfg: GPTConfig

    @nn.compact
    def __call__(self, tokens_BxS):
        logits = GPT(self.cfg, name="trunk")(tokens_BxS)
        return nn.Dense(1, name="head")(logits)[..., 0]


def sequence_reward(cfg: GPTConfig, params, tokens_BxS):
    return ScalarHead(cfg).apply({"params": params}, tokens_BxS)[:, -1]


def bradley_terry_loss(r_chosen_B, r_rejected_B):
    margin = r_chosen_B - r_rejected_B
    loss = -jax.nn.log_sigmoid(margin).mean()
    return loss, {"loss": loss, "accuracy": (margin > 0).astype(jnp.float32).mean(),
                  "margin": margin.mean()}


def reward_model_task(cfg: GPTConfig) -> Task:
    """For the shared loop: batches hold "chosen" and "rejected" token sequences [B, S]."""
    model = ScalarHead(cfg)

    def init(rng, batch):
        return nn.meta.unbox(model.init(rng, jnp.asarray(batch["chosen"][:1]))["params"]), {}

    def loss(params, model_state, batch, rng, train):
        both = jnp.concatenate([batch["chosen"], batch["rejected"]], 0)
        r = model.apply({"params": params}, both)[:, -1]
        value, metrics = bradley_terry_loss(*jnp.split(r, 2))
        return value, (metrics, model_state)

    return Task(init=init, loss=loss)


class PreferenceData:
    """Element i is batch i of (chosen, rejected) pairs: a labeler that prefers the right sum
    over a random wrong one (the stand-in for human raters)."""

    def __init__(self, task, batch_size: int, seed: int):
        self.task, self.batch_size, self.seed = task, batch_size, seed

    def __len__(self):
        return 2 ** 31

    def __getitem__(self, i: int) -> dict:
        rng = np.random.default_rng([self.seed, int(i)])
        t, n = self.task, self.batch_size
        idx = rng.integers(0, t.num_prompts, n)
        a, b = t.operands(idx)
        top = 2 * t.max_digit
        wrong = (a + b + rng.integers(1, top + 1, n)) % (top + 1)  # never the right sum
        prompt = t.prompts(idx)
        seq = lambda ans: np.concatenate([prompt, t.answer_tokens(ans)], -1)
        return {"chosen": seq(a + b), "rejected": seq(wrong)}
