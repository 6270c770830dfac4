"""Advantage estimators: GAE for PPO, group-normalized returns for GRPO."""
import jax
import jax.numpy as jnp


def gae(rewards_TxN, values_TxN, next_values_TxN, terminated_TxN, done_TxN,
                gamma: float, lam: float):
    """Generalized advantage estimation (Schulman et al. 2016, eq. 16), backwards in time.

    next_values[t] is V of the state actually reached after step t (the pre-reset final
    observation when the episode ended), so a time-limit truncation still bootstraps:
    `terminated` cuts the bootstrap (the true value of a terminal state is 0) while
    `done` (terminated or truncated) cuts the trace, since step t+1 then starts a new episode.

        delta_t = r_t + gamma * (1 - terminated_t) * V(s'_t) - V(s_t)
        A_t     = delta_t + gamma * lam * (1 - done_t) * A_{t+1}

    Returns (advantages_TxN, value_targets_TxN = advantages + values).
    """
    not_term = 1.0 - terminated_TxN.astype(jnp.float32)
    not_done = 1.0 - done_TxN.astype(jnp.float32)
    deltas = rewards_TxN + gamma * not_term * next_values_TxN - values_TxN

    def step(adv_next, xs):
        delta, nd = xs
        adv = delta + gamma * lam * nd * adv_next
        return adv, adv

    _, adv = jax.lax.scan(step, jnp.zeros_like(deltas[0]), (deltas, not_done), reverse=True)
    return adv, adv + values_TxN


def normalize(x, eps: float = 1e-8):
    """Zero mean, unit standard deviation over all elements."""
    return (x - x.mean()) / (x.std() + eps)


def group_advantages(rewards_PxG, eps: float = 1e-6):
    """GRPO (Shao et al. 2024, DeepSeekMath sec. 4.1.2): each of the G completions of one
    prompt is scored against its own group: (r - mean_group) / (std_group + eps).
    A group whose completions all score the same gets zero advantage: nothing to learn."""
    mean = rewards_PxG.mean(axis=-1, keepdims=True)
    std = rewards_PxG.std(axis=-1, keepdims=True)
    return (rewards_PxG - mean) / (std + eps)
