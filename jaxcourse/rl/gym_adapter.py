"""Training the same PPO agent on a non-JAX environment (gymnasium), stepped in Python.

Only the rollout changes: N gymnasium environments are stepped one Python call at a time
(with gymnax's auto-reset semantics: where an episode ends, the next observation is a reset
and the pre-reset one is kept as `final_obs`), the policy runs as one jitted call per step,
and the resulting `Transition` goes to the very same jitted `learn` as the gymnax path.
"""
import functools
import time

import gymnasium
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxcourse.errors import UserError
from jaxcourse.rl.ppo import Coefs, PPOConfig, learn, make_network
from jaxcourse.rl.rollout import Transition


class GymnasiumVecEnv:
    """N gymnasium environments with auto-reset; numpy in, numpy out."""

    def __init__(self, name: str, num_envs: int, seed: int):
        try:
            self.envs = [gymnasium.make(name) for _ in range(num_envs)]
        except gymnasium.error.Error as e:
            raise UserError(f"gymnasium cannot make {name!r}: {e}") from e
        space = self.envs[0].action_space
        if not isinstance(space, gymnasium.spaces.Discrete):
            raise UserError(f"{name} has a {type(space).__name__} action space; "
                            "this agent needs Discrete actions")
        self.num_actions = int(space.n)
        self.obs_shape = self.envs[0].observation_space.shape
        self.obs = np.stack([e.reset(seed=seed + i)[0] for i, e in enumerate(self.envs)])
        self.episode_return = np.zeros(num_envs, np.float32)
        self.last_return = np.zeros(num_envs, np.float32)

    def step(self, actions):
        """-> (reward, terminated, done, final_obs); self.obs becomes the next observation."""
        n = len(self.envs)
        reward, term, done = np.zeros(n, np.float32), np.zeros(n, bool), np.zeros(n, bool)
        final = np.empty_like(self.obs)
        for i, (env, a) in enumerate(zip(self.envs, actions)):
            obs, r, terminated, truncated, _ = env.step(int(a))
            reward[i], term[i], done[i], final[i] = r, terminated, terminated or truncated, obs
            self.episode_return[i] += r
            if done[i]:
                self.last_return[i] = self.episode_return[i]
                self.episode_return[i] = 0.0
                obs, _ = env.reset()
            self.obs[i] = obs
        return reward, term, done, final


def python_rollout(venv: GymnasiumVecEnv, act, params, rng, num_steps: int):
    """num_steps of every env; act(params, obs, key) -> (action, logits) is jitted.

    Returns (Transition [T, N, ...] as numpy, last observation, mean last return per step).
    """
    cols = {k: [] for k in ("obs", "action", "logits", "reward", "terminated", "done",
                            "final_obs")}
    returns = []
    for key in jax.random.split(rng, num_steps):
        obs = venv.obs.copy()
        action, logits = jax.device_get(act(params, obs, key))
        reward, term, done, final = venv.step(action)
        for k, v in zip(cols, (obs, action, logits, reward, term, done, final)):
            cols[k].append(v)
        returns.append(venv.last_return.mean())
    traj = Transition(**{k: np.stack(v) for k, v in cols.items()})
    return traj, venv.obs.copy(), float(np.mean(returns))


def train_gymnasium(cfg: PPOConfig, tx: optax.GradientTransformation, coefs: Coefs,
                    seed: int, log=lambda msg: None):
    """PPO on `cfg.env_name` from gymnasium. Returns (params, metrics per update, timing);
    learn_seconds leaves out the first update, whose time is compile_seconds."""
    venv = GymnasiumVecEnv(cfg.env_name, cfg.num_envs, seed)
    network = make_network(cfg, venv.num_actions, venv.obs_shape)
    rng, init_key = jax.random.split(jax.random.key(seed))
    params = network.init(init_key, jnp.zeros((1,) + venv.obs_shape))["params"]
    opt_state, kl_beta = tx.init(params), coefs.kl_coef

    @jax.jit
    def act(params, obs, key):
        logits = network.apply({"params": params}, obs, method="policy")
        return jax.random.categorical(key, logits), logits

    update = jax.jit(functools.partial(learn, network=network, tx=tx, cfg=cfg))
    history, t_roll, t_learn, t_compile = [], 0.0, 0.0, 0.0
    for u in range(cfg.num_updates):
        rng, roll_key, learn_key = jax.random.split(rng, 3)
        t0 = time.perf_counter()
        traj, last_obs, ret = python_rollout(venv, act, params, roll_key, cfg.num_steps)
        t1 = time.perf_counter()
        params, opt_state, kl_beta, metrics = jax.block_until_ready(update(
            params, opt_state, kl_beta, coefs, traj, last_obs, learn_key))
        t_roll += t1 - t0
        if u == 0:  # the first call compiles `learn`: count it apart
            t_compile = time.perf_counter() - t1
        else:
            t_learn += time.perf_counter() - t1
        history.append({"return": ret, **{k: float(v) for k, v in metrics.items()}})
        if (u + 1) % max(cfg.num_updates // 10, 1) == 0:
            log(f"update {u + 1}/{cfg.num_updates}: return {ret:.1f}")
    metrics = {k: np.array([h[k] for h in history]) for k in history[0]}
    return params, metrics, {"rollout_seconds": t_roll, "learn_seconds": t_learn,
                             "compile_seconds": t_compile}
