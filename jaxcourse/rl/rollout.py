"""Collecting experience from N vectorized gymnax environments inside jit.

Two choices keep the sequential loop short, which is what bounds a CPU run:
- all randomness of a rollout is drawn before the loop in a few batched calls (Gumbel noise
  for the actions, keys for the env steps, one fresh reset state per (step, env) to swap in
  where an episode ends). On CPU every threefry call inside a loop is itself a small rolled
  loop, and gymnax's own `env.step` draws two per step plus a reset it mostly discards;
- the rollout runs only the policy head: values come afterwards from one batched pass over
  all T*N observations (same parameters, hence the same numbers as inside the loop).
"""
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class Transition:
    """One rollout, time-major: every field is [T, N, ...]."""
    obs: jax.Array         # observation the action was chosen from
    action: jax.Array
    logits: jax.Array      # the policy's logits when acting (the "old" policy of the update)
    reward: jax.Array
    terminated: jax.Array  # the episode ended in a terminal state (no bootstrap)
    done: jax.Array        # terminated or truncated (time limit): the next obs is a reset
    final_obs: jax.Array   # the state actually reached (pre-reset when done)


@struct.dataclass
class EnvCarry:
    """Everything the environments carry from one step to the next."""
    env_state: Any
    obs: jax.Array             # [N, *obs_shape]
    episode_return: jax.Array  # [N] running return of the current episode
    last_return: jax.Array     # [N] return of the last finished episode (0 before any)
    episodes: jax.Array        # [N] number of finished episodes


def _reset_many(env, env_params, keys):
    """env.reset_env over keys of any batch shape."""
    flat = keys.reshape(-1)
    obs, state = jax.vmap(env.reset_env, in_axes=(0, None))(flat, env_params)
    return jax.tree.map(lambda x: x.reshape(keys.shape + x.shape[1:]), (obs, state))


def env_reset(env, env_params, rng, num_envs: int) -> EnvCarry:
    obs, state = _reset_many(env, env_params, jax.random.split(rng, num_envs))
    zeros = jnp.zeros((num_envs,), jnp.float32)
    return EnvCarry(state, obs, zeros, zeros, jnp.zeros((num_envs,), jnp.int32))


def _where_rows(mask_N, a, b):
    return jnp.where(mask_N.reshape(mask_N.shape + (1,) * (a.ndim - 1)), a, b)


def env_step(env, env_params, carry: EnvCarry, action_N, logits_NxA, keys_N, reset_obs,
             reset_state):
    """Steps every environment once, swapping in the given reset where an episode ended
    (gymnax's auto-reset semantics), and updates the episode statistics."""
    obs_st, state_st, reward, terminated, _ = jax.vmap(
        env.step_env, in_axes=(0, 0, 0, None))(keys_N, carry.env_state, action_N, env_params)
    truncated = jax.vmap(env.is_truncated, in_axes=(0, None))(state_st, env_params)
    done = jnp.logical_or(terminated, truncated)
    state = jax.tree.map(lambda r, s: _where_rows(done, r, s), reset_state, state_st)
    obs = _where_rows(done, reset_obs, obs_st)
    reward = reward.astype(jnp.float32)
    ep_ret = carry.episode_return + reward
    new_carry = EnvCarry(
        env_state=state, obs=obs,
        episode_return=jnp.where(done, 0.0, ep_ret),
        last_return=jnp.where(done, ep_ret, carry.last_return),
        episodes=carry.episodes + done.astype(jnp.int32))
    return new_carry, Transition(carry.obs, action_N, logits_NxA, reward, terminated, done,
                                 obs_st)


def rollout(env, env_params, policy_fn: Callable, params, carry: EnvCarry, rng,
            num_steps: int):
    """Runs num_steps of all environments under policy_fn(params, obs_NxO) -> logits_NxA.

    Returns (carry, Transition [T, N, ...], last_return_TxN) where last_return_TxN is the
    per-step return of each env's last finished episode (the curve purejaxrl plots).
    """
    n = carry.obs.shape[0]
    num_actions = jax.eval_shape(policy_fn, params, carry.obs).shape[-1]
    k_act, k_step, k_reset = jax.random.split(rng, 3)
    # Sampling a categorical = argmax(logits + Gumbel noise) (what jax.random.categorical does).
    gumbel_TxNxA = jax.random.gumbel(k_act, (num_steps, n, num_actions))
    step_keys_TxN = jax.random.split(k_step, (num_steps, n))
    resets = _reset_many(env, env_params, jax.random.split(k_reset, (num_steps, n)))

    def step(c, xs):
        gumbel_NxA, keys_N, (reset_obs, reset_state) = xs
        logits = policy_fn(params, c.obs)
        action = jnp.argmax(logits + gumbel_NxA, axis=-1)
        c, tr = env_step(env, env_params, c, action, logits, keys_N, reset_obs, reset_state)
        return c, (tr, c.last_return)

    carry, (traj, last_ret) = jax.lax.scan(step, carry, (gumbel_TxNxA, step_keys_TxN, resets))
    return carry, traj, last_ret
