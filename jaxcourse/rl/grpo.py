"""GRPO (Shao et al. 2024, DeepSeekMath sec. 4.1): PPO without a critic, for language models.

For each prompt, sample a group of G completions from the current policy, score them with a
reward, and use the group-normalized reward as the advantage of every completion token.
The loss is PPO's clipped ratio per token plus a KL penalty to a frozen reference policy
(the k3 estimator, always >= 0), averaged over each completion's tokens, then over completions:

    L = -mean_i mean_t [ min(r_it A_i, clip(r_it, 1-eps, 1+eps) A_i) - beta KL_it ]

One iteration (sample, score, `inner_steps` gradient steps on the same samples) is one
jitted function; `policy_task` makes it the update step of the shared loop (checkpoints,
exact resume, metrics, progress).
"""
import dataclasses
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxcourse.models import decode
from jaxcourse.models.transformer import GPT, GPTConfig
from jaxcourse.rl.advantages import group_advantages
from jaxcourse.train import Task


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    prompts_per_step: int = 16
    group_size: int = 8          # G completions per prompt
    max_new_tokens: int = 3
    inner_steps: int = 2         # gradient steps per batch of samples (mu in the paper)
    clip_eps: float = 0.2
    kl_coef: float = 0.04        # beta: weight of KL(policy || reference)
    temperature: float = 1.0


class Rollout(NamedTuple):
    tokens_BxS: jax.Array      # prompt + completion
    mask_BxC: jax.Array        # completion tokens that count (up to and including EOS)
    advantages_B: jax.Array
    old_logp_BxC: jax.Array
    ref_logp_BxC: jax.Array
    rewards_B: jax.Array


def completion_mask(completion_BxC, eos_id: int):
    """1 for tokens up to and including the first EOS; generation pads with EOS after it."""
    is_eos = (completion_BxC == eos_id).astype(jnp.int32)
    before = jnp.cumsum(is_eos, axis=1) - is_eos  # EOS tokens strictly before t
    return (before == 0).astype(jnp.float32)


def token_logprobs(model_cfg: GPTConfig, params, tokens_BxS, prompt_len: int):
    """log pi(completion token t | prefix) for every completion position: [B, S - prompt_len]."""
    logits = GPT(model_cfg).apply({"params": params}, tokens_BxS[:, :-1])
    logp = jax.nn.log_softmax(logits[:, prompt_len - 1:], axis=-1)
    return jnp.take_along_axis(logp, tokens_BxS[:, prompt_len:, None], -1)[..., 0]


def grpo_loss(logp_BxC, old_logp_BxC, ref_logp_BxC, advantages_B, mask_BxC, clip_eps,
              kl_coef):
    """The GRPO objective as a loss, and (clip fraction, mean KL to the reference)."""
    ratio = jnp.exp(logp_BxC - old_logp_BxC)
    adv = advantages_B[:, None]
    surrogate = jnp.minimum(ratio * adv, jnp.clip(ratio, 1 - clip_eps, 1 + clip_eps) * adv)
    log_ref_ratio = ref_logp_BxC - logp_BxC
    kl = jnp.exp(log_ref_ratio) - log_ref_ratio - 1.0  # k3: unbiased, >= 0
    per_token = -(surrogate - kl_coef * kl)
    n_tok = jnp.maximum(mask_BxC.sum(-1), 1.0)
    seq_mean = lambda x: ((x * mask_BxC).sum(-1) / n_tok).mean()
    clipped = (jnp.abs(ratio - 1.0) > clip_eps).astype(jnp.float32)
    return seq_mean(per_token), {"clip_frac": seq_mean(clipped), "kl": seq_mean(kl)}


def sample_groups(model_cfg: GPTConfig, params, prompts_PxT, rng, cfg: GRPOConfig,
                  eos_id: int):
    """G completions for every prompt: ([P*G, T] prompts, [P*G, C] completions)."""
    prompts = jnp.repeat(prompts_PxT, cfg.group_size, axis=0)
    completion = decode.generate(GPT(model_cfg), params, prompts, rng,
                                 max_new_tokens=cfg.max_new_tokens,
                                 temperature=cfg.temperature, eos_id=eos_id)
    return prompts, completion


def make_rollout(model_cfg, params, ref_params, prompt_idx_P, rng, cfg: GRPOConfig, task,
                 reward_fn: Callable) -> Rollout:
    """Sample, score with reward_fn(prompt_idx [B], completion [B, C]) and normalize per group."""
    prompts, completion = sample_groups(model_cfg, params, task.prompts(prompt_idx_P), rng,
                                        cfg, task.eos_id)
    idx_B = jnp.repeat(prompt_idx_P, cfg.group_size)
    rewards = reward_fn(idx_B, completion)
    adv = group_advantages(rewards.reshape(-1, cfg.group_size)).reshape(-1)
    tokens = jnp.concatenate([prompts, completion], axis=1)
    t = prompts.shape[1]
    old = jax.lax.stop_gradient(token_logprobs(model_cfg, params, tokens, t))
    ref = token_logprobs(model_cfg, ref_params, tokens, t)
    return Rollout(tokens, completion_mask(completion, task.eos_id), adv, old, ref, rewards)


def make_grpo_step(model_cfg: GPTConfig, cfg: GRPOConfig, task, reward_fn: Callable,
                   tx: optax.GradientTransformation):
    """(params, opt_state, ref_params, rng) -> (params, opt_state, metrics), one iteration."""

    def loss_fn(params, ro: Rollout, prompt_len):
        logp = token_logprobs(model_cfg, params, ro.tokens_BxS, prompt_len)
        return grpo_loss(logp, ro.old_logp_BxC, ro.ref_logp_BxC, ro.advantages_B,
                         ro.mask_BxC, cfg.clip_eps, cfg.kl_coef)

    def step(params, opt_state, ref_params, rng):
        k_prompt, k_sample = jax.random.split(rng)
        idx = jax.random.randint(k_prompt, (cfg.prompts_per_step,), 0, task.num_prompts)
        ro = make_rollout(model_cfg, params, ref_params, idx, k_sample, cfg, task, reward_fn)
        prompt_len = ro.tokens_BxS.shape[1] - cfg.max_new_tokens

        def inner(carry, _):
            p, o = carry
            (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(p, ro, prompt_len)
            updates, o = tx.update(grads, o, p)
            return (optax.apply_updates(p, updates), o), {"loss": loss, **aux}

        (params, opt_state), m = jax.lax.scan(inner, (params, opt_state), None,
                                              length=cfg.inner_steps)
        metrics = {k: v.mean() for k, v in m.items()}
        metrics.update(reward=ro.rewards_B.mean(),
                       response_length=ro.mask_BxC.sum(-1).mean(),
                       zero_signal_groups=(ro.rewards_B.reshape(-1, cfg.group_size).std(-1)
                                           == 0).mean())
        return params, opt_state, metrics

    return jax.jit(step)


def policy_task(make_step: Callable, params, ref_params, seed: int | None = None) -> Task:
    """A Task for the shared loop whose update is one RL iteration.

    make_step(tx) -> step(params, opt_state, ref_params, rng) -> (params, opt_state, metrics),
    e.g. `lambda tx: make_grpo_step(model_cfg, cfg, task, reward_fn, tx)`; the metrics must
    include "loss". The policy starts from `params`; the frozen reference rides in
    model_state. The loop's batches are ignored (the step samples its own prompts), so
    train_data can be `[{}] * steps`. With `seed`, step s draws from fold_in(key(seed), s)
    instead of the loop's key: the stream chapter 6 used before, so its results are unchanged.
    """

    def init(rng, batch):
        del rng, batch
        return params, {"ref": ref_params}

    def update(state, batch, rng, tx):
        del batch
        if seed is not None:
            rng = jax.random.fold_in(jax.random.key(seed), state.step)
        new_params, opt_state, metrics = make_step(tx)(state.params, state.opt_state,
                                                       state.model_state["ref"], rng)
        return state.replace(params=new_params, opt_state=opt_state), metrics

    return Task(init=init, update=update)


def mean_reward(model_cfg: GPTConfig, params, task, reward_fn, rng, samples_per_prompt: int,
                temperature: float = 1.0, max_new_tokens: int = 3) -> float:
    """Mean reward over every prompt of the task, sampling at `temperature`."""
    idx = jnp.arange(task.num_prompts)
    cfg = GRPOConfig(group_size=samples_per_prompt, temperature=temperature,
                     max_new_tokens=max_new_tokens)
    _, completion = sample_groups(model_cfg, params, task.prompts(idx), rng, cfg,
                                  task.eos_id)
    return float(reward_fn(jnp.repeat(idx, samples_per_prompt), completion).mean())
