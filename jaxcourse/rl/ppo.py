"""PPO as one compiled function (purejaxrl-style `make_train(cfg, tx) -> train(rng, coefs)`).

A whole run (rollout -> GAE -> epochs of minibatch updates, repeated) is a `lax.scan`, so
`jax.jit(train)` compiles once and `jax.jit(jax.vmap(train))` trains many agents at once:
over seeds, or over a grid of loss coefficients (`Coefs` are traced values, not constants).
Runs can also be cut into chunks of updates (`run_updates`) and checkpointed in between;
the state between chunks is one pytree (`Runner`), so resuming is exact.

The pieces are top-level functions: `rollout` (rollout.py), `gae` (advantages.py), the
losses (losses.py), `ppo_loss` and `learn` here. `learn` takes a finished rollout, so a
Python-stepped environment (gym_adapter.py) reuses it unchanged.
"""
import dataclasses
from typing import Callable, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import optax

from jaxcourse.errors import UserError
from jaxcourse.rl import losses
from jaxcourse.rl.advantages import gae, normalize
from jaxcourse.rl.envs import make_env
from jaxcourse.rl.networks import ActorCritic, ActorCriticConfig
from jaxcourse.rl.rollout import EnvCarry, Transition, env_reset, rollout

OBJECTIVES = ("clip", "kl")


@dataclasses.dataclass(frozen=True)
class PPOConfig:
    """Everything that fixes the shapes and the program; Coefs holds the traced numbers."""
    env_name: str = "CartPole-v1"
    num_envs: int = 4
    num_steps: int = 128            # rollout length per env per update
    total_timesteps: int = 500_000
    update_epochs: int = 4
    num_minibatches: int = 4
    gamma: float = 0.99
    gae_lambda: float = 0.95
    objective: str = "clip"         # "clip": PPO-clip; "kl": unclipped surrogate + KL penalty
    kl_target: float = 0.0          # > 0: adapt the KL coefficient (PPO paper, sec. 4)
    clip_value: bool = True
    normalize_advantages: bool = True
    bootstrap_truncation: bool = True  # False treats time limits as terminal (purejaxrl)
    hidden: int = 64
    depth: int = 2
    activation: str = "tanh"

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise UserError(f"ppo.objective={self.objective!r} is not one of {OBJECTIVES}")
        batch = self.num_envs * self.num_steps
        if min(self.num_envs, self.num_steps, self.update_epochs, self.num_minibatches) < 1:
            raise UserError("ppo.num_envs, num_steps, update_epochs, num_minibatches must be >= 1")
        if batch % self.num_minibatches:
            raise UserError(f"ppo.num_envs * ppo.num_steps = {batch} is not divisible by "
                            f"ppo.num_minibatches = {self.num_minibatches}")
        if self.total_timesteps < batch:
            raise UserError(f"ppo.total_timesteps={self.total_timesteps} is less than one "
                            f"rollout ({batch} steps)")

    @property
    def num_updates(self) -> int:
        return self.total_timesteps // (self.num_envs * self.num_steps)

    @property
    def grad_steps(self) -> int:
        """Optimizer steps in the whole run: what an LR schedule anneals over."""
        return self.num_updates * self.update_epochs * self.num_minibatches


@flax.struct.dataclass
class Coefs:
    """Loss coefficients as arrays, so a grid of them can be vmapped in one compile."""
    clip_eps: jax.Array
    ent_coef: jax.Array
    vf_coef: jax.Array
    kl_coef: jax.Array   # initial (adaptive) or fixed weight of KL(old || new)

    @classmethod
    def make(cls, clip_eps=0.2, ent_coef=0.01, vf_coef=0.5, kl_coef=0.0):
        f = lambda v: jnp.asarray(v, jnp.float32)
        return cls(f(clip_eps), f(ent_coef), f(vf_coef), f(kl_coef))


@flax.struct.dataclass
class Runner:
    """The whole state of a run between updates (one pytree: checkpoint it as is)."""
    params: dict
    opt_state: optax.OptState
    env: EnvCarry
    kl_beta: jax.Array   # current KL coefficient (moves only when kl_target > 0)
    coefs: Coefs
    rng: jax.Array       # typed PRNG key
    update: jax.Array    # updates done so far


class Batch(NamedTuple):
    """Flat [B, ...] training samples: one rollout after the value pass and GAE."""
    obs: jax.Array
    action: jax.Array
    old_logits: jax.Array
    old_values: jax.Array
    advantages: jax.Array
    targets: jax.Array


def make_network(cfg: PPOConfig, num_actions: int, obs_shape) -> ActorCritic:
    return ActorCritic(ActorCriticConfig(num_actions, cfg.hidden, cfg.depth, cfg.activation,
                                         obs_rank=len(obs_shape)))


def default_optimizer(cfg: PPOConfig, lr: float = 2.5e-4, clip_norm: float = 0.5,
                      anneal: bool = True) -> optax.GradientTransformation:
    """Adam with global-norm clipping and linear LR annealing to 0 (purejaxrl's setting)."""
    sched = optax.linear_schedule(lr, 0.0, cfg.grad_steps) if anneal else lr
    return optax.chain(optax.clip_by_global_norm(clip_norm), optax.adam(sched, eps=1e-5))


def ppo_loss(params, network: ActorCritic, cfg: PPOConfig, mb: Batch, coefs: Coefs,
             kl_beta):
    """The PPO loss on one minibatch -> (loss, metrics)."""
    logits, values = network.apply({"params": params}, mb.obs)
    logp_all = jax.nn.log_softmax(logits)
    old_logp_all = jax.nn.log_softmax(mb.old_logits)
    take = lambda lp: jnp.take_along_axis(lp, mb.action[:, None], -1)[:, 0]
    log_ratio = take(logp_all) - take(old_logp_all)
    adv = normalize(mb.advantages) if cfg.normalize_advantages else mb.advantages
    clip_pg, clip_frac = losses.clipped_surrogate(log_ratio, adv, coefs.clip_eps)
    pg = clip_pg if cfg.objective == "clip" else -(jnp.exp(log_ratio) * adv).mean()
    kl = losses.categorical_kl(mb.old_logits, logits).mean()
    v_loss = losses.value_loss(values, mb.old_values, mb.targets, coefs.clip_eps,
                               cfg.clip_value)
    entropy = losses.categorical_entropy(logits).mean()
    loss = pg + coefs.vf_coef * v_loss - coefs.ent_coef * entropy + kl_beta * kl
    return loss, {"loss": loss, "policy_loss": pg, "value_loss": v_loss,
                  "entropy": entropy, "kl": kl, "approx_kl": losses.approx_kl(log_ratio),
                  "clip_frac": clip_frac}


def make_batch(params, network: ActorCritic, cfg: PPOConfig, traj: Transition,
               last_obs) -> Batch:
    """Values of the rollout in one batched critic pass, then GAE; flattened to [T*N, ...].

    last_obs [N, ...] is the observation after the last step: it bootstraps the final step.
    """
    value = lambda o: network.apply({"params": params}, o, method="value")
    values_T1xN = value(jnp.concatenate([traj.obs, last_obs[None]], axis=0))
    values, next_values = values_T1xN[:-1], values_T1xN[1:]
    if cfg.bootstrap_truncation:
        # Where an episode ended, the next obs is a reset: bootstrap a time limit from
        # the state actually reached instead (only terminations get value 0).
        next_values = jnp.where(traj.done, value(traj.final_obs), next_values)
        terminated = traj.terminated
    else:  # a time limit counts as terminal, as in purejaxrl
        terminated = traj.done
    adv, targets = gae(traj.reward, values, next_values, terminated, traj.done,
                       cfg.gamma, cfg.gae_lambda)
    flat = lambda x: x.reshape((-1,) + x.shape[2:])
    return Batch(flat(traj.obs), flat(traj.action), flat(traj.logits), flat(values),
                 flat(adv), flat(targets))


def learn(params, opt_state, kl_beta, coefs: Coefs, traj: Transition, last_obs, rng, *,
          network: ActorCritic, tx: optax.GradientTransformation, cfg: PPOConfig):
    """update_epochs passes of shuffled minibatch steps on one rollout.

    Returns (params, opt_state, kl_beta, metrics): metrics are means over every minibatch
    step, plus explained variance of the pre-update values.
    """
    batch = make_batch(params, network, cfg, traj, last_obs)
    n = batch.obs.shape[0]
    grad_fn = jax.grad(ppo_loss, has_aux=True)

    def minibatch_step(carry, mb):
        p, o = carry
        grads, metrics = grad_fn(p, network, cfg, mb, coefs, kl_beta)
        updates, o = tx.update(grads, o, p)
        return (optax.apply_updates(p, updates), o), metrics

    def epoch(carry, key):
        perm = jax.random.permutation(key, n)
        shaped = jax.tree.map(
            lambda x: jnp.take(x, perm, axis=0).reshape(
                (cfg.num_minibatches, -1) + x.shape[1:]), batch)
        return jax.lax.scan(minibatch_step, carry, shaped)

    (params, opt_state), metrics = jax.lax.scan(
        epoch, (params, opt_state), jax.random.split(rng, cfg.update_epochs))
    metrics = jax.tree.map(jnp.mean, metrics)
    metrics["explained_variance"] = losses.explained_variance(batch.old_values, batch.targets)
    metrics["kl_beta"] = kl_beta
    return params, opt_state, adapt_kl_beta(kl_beta, metrics["kl"], cfg.kl_target), metrics


def adapt_kl_beta(beta, kl, kl_target: float):
    """PPO paper sec. 4: halve beta when KL < target/1.5, double it when KL > 1.5 target."""
    if kl_target <= 0:
        return beta
    return jnp.where(kl < kl_target / 1.5, beta / 2,
                     jnp.where(kl > kl_target * 1.5, beta * 2, beta))


class PPOFns(NamedTuple):
    init: Callable        # (rng, coefs) -> Runner
    run_updates: Callable  # (runner, num_updates: static int) -> (runner, metrics [U])
    train: Callable        # (rng, coefs) -> (runner, metrics [num_updates])
    network: ActorCritic


def make_train(cfg: PPOConfig, tx: optax.GradientTransformation | None = None) -> PPOFns:
    """Builds the (un-jitted) functions of one PPO run; jit / vmap them as needed."""
    env, env_params, num_actions, obs_shape = make_env(cfg.env_name)
    network = make_network(cfg, num_actions, obs_shape)
    tx = tx if tx is not None else default_optimizer(cfg)
    policy_fn = lambda p, obs: network.apply({"params": p}, obs, method="policy")

    def init(rng, coefs: Coefs) -> Runner:
        rng = jax.random.key(rng) if jnp.ndim(rng) == 0 else rng
        rng, net_key, env_key = jax.random.split(rng, 3)
        params = network.init(net_key, jnp.zeros((1,) + obs_shape))["params"]
        carry = env_reset(env, env_params, env_key, cfg.num_envs)
        return Runner(params, tx.init(params), carry, coefs.kl_coef, coefs, rng,
                      jnp.zeros((), jnp.int32))

    def one_update(r: Runner, _):
        rng, roll_key, learn_key = jax.random.split(r.rng, 3)
        carry, traj, last_ret = rollout(env, env_params, policy_fn, r.params, r.env,
                                        roll_key, cfg.num_steps)
        params, opt_state, beta, metrics = learn(
            r.params, r.opt_state, r.kl_beta, r.coefs, traj, carry.obs, learn_key,
            network=network, tx=tx, cfg=cfg)
        metrics["return"] = last_ret.mean()
        metrics["episodes"] = traj.done.sum()
        r = Runner(params, opt_state, carry, beta, r.coefs, rng, r.update + 1)
        return r, metrics

    def run_updates(runner: Runner, num_updates: int):
        return jax.lax.scan(one_update, runner, None, length=num_updates)

    def train(rng, coefs: Coefs):
        return run_updates(init(rng, coefs), cfg.num_updates)

    return PPOFns(init, run_updates, train, network)
