"""The actor-critic network: two separate MLPs (policy logits, state value).

Separate towers, tanh and orthogonal init with a small last policy layer (gain 0.01)
follow "The 37 implementation details of PPO": the initial policy is near uniform and
the critic's errors do not leak into the policy features.
"""
import dataclasses

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

_ACTIVATIONS = {"tanh": nn.tanh, "relu": nn.relu}


@dataclasses.dataclass(frozen=True)
class ActorCriticConfig:
    num_actions: int
    hidden: int = 64
    depth: int = 2
    activation: str = "tanh"
    obs_rank: int = 1  # trailing observation dims, flattened before the first layer

    def __post_init__(self):
        if self.activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, "
                             f"got {self.activation!r}")


class MLP(nn.Module):
    hidden: int
    depth: int
    out: int
    out_gain: float
    activation: str

    @nn.compact
    def __call__(self, x):
        act = _ACTIVATIONS[self.activation]
        for _ in range(self.depth):
            x = act(nn.Dense(self.hidden, kernel_init=nn.initializers.orthogonal(np.sqrt(2)))(x))
        return nn.Dense(self.out, kernel_init=nn.initializers.orthogonal(self.out_gain))(x)


class ActorCritic(nn.Module):
    """obs [..., *obs_shape] -> (logits [..., A], value [...])."""
    cfg: ActorCriticConfig

    def setup(self):
        c = self.cfg
        self.actor = MLP(c.hidden, c.depth, c.num_actions, 0.01, c.activation)
        self.critic = MLP(c.hidden, c.depth, 1, 1.0, c.activation)

    def _features(self, obs):
        r = self.cfg.obs_rank
        flat = obs.reshape(obs.shape[:obs.ndim - r] + (-1,)) if r != 1 else obs
        return flat.astype(jnp.float32)

    def __call__(self, obs):
        x = self._features(obs)
        return self.actor(x), self.critic(x)[..., 0]

    def policy(self, obs):
        return self.actor(self._features(obs))

    def value(self, obs):
        return self.critic(self._features(obs))[..., 0]
