"""makemore-style character language models: a bigram table and Bengio's MLP.

Both map tokens [B, T] to next-token logits [B, T, V] at every position, so they
train on the same random windows as a transformer (`data.pipeline.lm_batches`).

  * Bigram: logits(next | current) is a learned V x V table. Its best possible
    loss is the conditional entropy of the corpus's bigram counts, a closed form
    (`count_bigram_nll`) the trained table must approach.
  * MLP (Bengio et al. 2003, "A Neural Probabilistic Language Model"): embed the
    last `context` characters, concatenate, one tanh hidden layer, softmax.
    Positions near the window start see a PAD id (= vocab_size) for the
    characters before it, so every position still predicts something.

    model = CharLM(CharLMConfig(vocab_size=V, kind="mlp", context=8))
    params = nn.meta.unbox(model.init(rng, tokens_BxT)["params"])
    logits_BxTxV = model.apply({"params": params}, tokens_BxT)
"""

from __future__ import annotations

import dataclasses
import functools

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxcourse.errors import UserError

KINDS = ("bigram", "mlp")


@dataclasses.dataclass(frozen=True)
class CharLMConfig:
    vocab_size: int
    kind: str = "mlp"      # "bigram" | "mlp"
    context: int = 3       # MLP only: characters the prediction looks back on
    embed_dim: int = 16    # MLP only
    hidden_dim: int = 128  # MLP only

    def __post_init__(self):
        if self.kind not in KINDS:
            raise UserError(f"charlm kind={self.kind!r} is not one of {', '.join(KINDS)}")
        for name in ("vocab_size", "context", "embed_dim", "hidden_dim"):
            if getattr(self, name) < 1:
                raise UserError(f"charlm {name} must be >= 1, got {getattr(self, name)}")


def _init(init, names):
    return nn.with_logical_partitioning(init, names)


def context_windows(tokens_BxT: jax.Array, context: int, pad_id: int) -> jax.Array:
    """[B, T] -> [B, T, context]: for each position, the `context` tokens ending there.

    windows[b, t, k] = tokens[b, t - context + 1 + k], PAD before the sequence start.
    """
    padded_BxP = jnp.pad(tokens_BxT, ((0, 0), (context - 1, 0)), constant_values=pad_id)
    length = tokens_BxT.shape[1]
    return jnp.stack([padded_BxP[:, k:k + length] for k in range(context)], axis=-1)


class CharLM(nn.Module):
    cfg: CharLMConfig

    @nn.compact
    def __call__(self, tokens_BxT: jax.Array) -> jax.Array:
        c = self.cfg
        if tokens_BxT.ndim != 2:
            raise UserError(f"CharLM expects tokens of shape [batch, length], got {tokens_BxT.shape}")
        if c.kind == "bigram":
            # Zero init = uniform predictions, the right prior for a count table.
            table_VxV = self.param("table", _init(nn.initializers.zeros, ("vocab", "vocab")),
                                   (c.vocab_size, c.vocab_size))
            return table_VxV[tokens_BxT]
        embed_PxE = self.param(  # P = vocab + 1: the extra row is the PAD id.
            "embed", _init(nn.initializers.normal(1.0), ("vocab", "embed")),
            (c.vocab_size + 1, c.embed_dim))
        windows_BxTxC = context_windows(tokens_BxT, c.context, pad_id=c.vocab_size)
        x_BxTxCE = einops.rearrange(embed_PxE[windows_BxTxC], "b t c e -> b t (c e)")
        x_BxTxCE = nn.with_logical_constraint(x_BxTxCE, ("batch", "length", "embed"))
        h_BxTxH = jnp.tanh(nn.Dense(c.hidden_dim, name="hidden",
                                    kernel_init=_init(nn.initializers.lecun_normal(), ("embed", "mlp")),
                                    bias_init=_init(nn.initializers.zeros, ("mlp",)))(x_BxTxCE))
        return nn.Dense(c.vocab_size, name="out",
                        kernel_init=_init(nn.initializers.lecun_normal(), ("mlp", "vocab")),
                        bias_init=_init(nn.initializers.zeros, ("vocab",)))(h_BxTxH)


def next_token_loss(logits_BxTxV: jax.Array, targets_BxT: jax.Array) -> jax.Array:
    """Mean cross-entropy in nats per character."""
    return optax.softmax_cross_entropy_with_integer_labels(logits_BxTxV, targets_BxT).mean()


def count_bigram_nll(train_ids: np.ndarray, eval_ids: np.ndarray, vocab_size: int,
                     smoothing: float = 1.0) -> float:
    """makemore part 1: P(b | a) = (count(a, b) + s) / (count(a) + s V), no gradients at all.

    Returns the mean negative log-likelihood of eval_ids' bigrams (nats per char).
    """
    counts_VxV = np.zeros((vocab_size, vocab_size), np.float64)
    np.add.at(counts_VxV, (train_ids[:-1], train_ids[1:]), 1.0)
    probs_VxV = (counts_VxV + smoothing) / (counts_VxV + smoothing).sum(axis=1, keepdims=True)
    return float(-np.mean(np.log(probs_VxV[eval_ids[:-1], eval_ids[1:]])))


def sample(model: CharLM, params, prompt_ids: list[int], num_chars: int, rng: jax.Array,
           temperature: float = 1.0) -> list[int]:
    """Ancestral sampling: each new character from the model's view of the last `context`."""
    if not prompt_ids:
        raise UserError("sampling needs a non-empty prompt")
    window = 1 if model.cfg.kind == "bigram" else model.cfg.context
    recent = list(prompt_ids)[-window:]
    start_W = jnp.asarray([model.cfg.vocab_size] * (window - len(recent)) + recent)  # PAD-left
    ids = _sample_scan(model, num_chars, temperature, params, start_W, rng)
    return np.asarray(ids).tolist()


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _sample_scan(model, num_chars, temperature, params, start_W, rng):
    """All steps in one compiled scan; the carry is the sliding window of ids."""

    def step(window_W, key):
        logits_V = model.apply({"params": params}, window_W[None])[0, -1] / temperature
        nxt = jax.random.categorical(key, logits_V).astype(window_W.dtype)
        return jnp.concatenate([window_W[1:], nxt[None]]), nxt

    _, ids = jax.lax.scan(step, start_W, jax.random.split(rng, num_chars))
    return ids
