"""PPO for a language model with a learned reward (the InstructGPT recipe, small).

Each completion token is an action. The per-token reward is -beta * (log pi - log pi_ref)
(a KL penalty to the frozen SFT policy), plus the reward model's score on the last counted
token. A value model (same trunk design as the reward model) gives per-token baselines, and
the advantages come from the chapter's `gae` over the completion (gamma = 1). Compared with
GRPO, PPO-LM needs the extra value network; GRPO replaces it with the group mean.
"""
import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import optax

from jaxcourse.models.transformer import GPTConfig
from jaxcourse.rl import grpo, losses
from jaxcourse.rl.advantages import gae
from jaxcourse.rl.reward_model import ScalarHead


@dataclasses.dataclass(frozen=True)
class LMPPOConfig:
    batch_size: int = 128        # completions per step (same samples as GRPO's P x G)
    max_new_tokens: int = 3
    inner_steps: int = 2
    clip_eps: float = 0.2
    kl_coef: float = 0.04
    vf_coef: float = 0.5
    gae_lambda: float = 0.95
    temperature: float = 1.0


def token_rewards(score_B, logp_BxC, ref_logp_BxC, mask_BxC, kl_coef):
    """-beta * KL estimate per token, plus the sequence score on the last counted token."""
    last = (jnp.cumsum(mask_BxC, 1) == mask_BxC.sum(1, keepdims=True)) & (mask_BxC > 0)
    return -kl_coef * (logp_BxC - ref_logp_BxC) * mask_BxC + score_B[:, None] * last, last


def masked_normalize(x, mask, eps: float = 1e-8):
    """Zero mean, unit std over the counted entries; padding stays 0."""
    n = jnp.maximum(mask.sum(), 1.0)
    mean = (x * mask).sum() / n
    std = jnp.sqrt((jnp.square(x - mean) * mask).sum() / n)
    return (x - mean) / (std + eps) * mask


def make_lm_ppo_step(model_cfg: GPTConfig, cfg: LMPPOConfig, task, score_fn: Callable,
                     tx: optax.GradientTransformation):
    """((policy, value) params, opt_state, ref_params, rng) -> (params, opt_state, metrics).
    score_fn(prompt_idx [B], tokens [B, S]) -> [B] sequence reward (e.g. the reward model)."""
    values_of = lambda vp, tokens, t: ScalarHead(model_cfg).apply({"params": vp}, tokens)[
        :, t - 1:-1]  # value of the prefix that predicts each completion token

    def loss_fn(both, batch, t):
        params, vparams = both
        logp = grpo.token_logprobs(model_cfg, params, batch["tokens"], t)
        ratio_log = logp - batch["old_logp"]
        m = batch["mask"]
        n = jnp.maximum(m.sum(), 1.0)
        ratio = jnp.exp(ratio_log)
        adv = batch["adv"]
        pg = -(jnp.minimum(ratio * adv, jnp.clip(ratio, 1 - cfg.clip_eps, 1 + cfg.clip_eps)
                           * adv) * m).sum() / n
        v = values_of(vparams, batch["tokens"], t)
        v_loss = 0.5 * (jnp.square(v - batch["targets"]) * m).sum() / n
        clip_frac = ((jnp.abs(ratio - 1) > cfg.clip_eps) * m).sum() / n
        return pg + cfg.vf_coef * v_loss, {"policy_loss": pg, "value_loss": v_loss,
                                           "clip_frac": clip_frac}

    def step(both, opt_state, ref_params, rng):
        params, vparams = both
        k_prompt, k_sample = jax.random.split(rng)
        idx = jax.random.randint(k_prompt, (cfg.batch_size,), 0, task.num_prompts)
        gc = grpo.GRPOConfig(group_size=1, max_new_tokens=cfg.max_new_tokens,
                             temperature=cfg.temperature)
        prompts, completion = grpo.sample_groups(model_cfg, params, task.prompts(idx),
                                                 k_sample, gc, task.eos_id)
        t = prompts.shape[1]
        tokens = jnp.concatenate([prompts, completion], 1)
        mask = grpo.completion_mask(completion, task.eos_id)
        old_logp = grpo.token_logprobs(model_cfg, params, tokens, t)
        ref_logp = grpo.token_logprobs(model_cfg, ref_params, tokens, t)
        score = score_fn(idx, tokens)
        rewards, last = token_rewards(score, old_logp, ref_logp, mask, cfg.kl_coef)
        values = values_of(vparams, tokens, t) * mask
        next_values = jnp.concatenate([values[:, 1:], jnp.zeros_like(values[:, :1])], 1)
        adv, targets = gae(rewards.T, values.T, next_values.T, last.T, last.T, 1.0,
                           cfg.gae_lambda)
        adv = masked_normalize(adv.T, mask)
        batch = {"tokens": tokens, "old_logp": old_logp, "mask": mask, "adv": adv,
                 "targets": targets.T}

        def inner(carry, _):
            p, o = carry
            (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(p, batch, t)
            updates, o = tx.update(grads, o, p)
            return (optax.apply_updates(p, updates), o), {"loss": loss, **aux}

        (both, opt_state), m = jax.lax.scan(inner, (both, opt_state), None,
                                            length=cfg.inner_steps)
        kl = ((old_logp - ref_logp) * mask).sum(1).mean()
        metrics = {k: v.mean() for k, v in m.items()}
        metrics.update(score=score.mean(), reward=task.reward(idx, completion).mean(),
                       kl=kl, response_length=mask.sum(1).mean(),
                       explained_variance=losses.explained_variance(values, targets.T))
        return both, opt_state, metrics

    return jax.jit(step)
