"""Environments: gymnax (pure JAX, steps inside jit) behind one small constructor."""
import gymnax

from jaxcourse.errors import UserError

# Discrete-action environments the actor-critic here can drive.
DISCRETE_ENVS = ("CartPole-v1", "Acrobot-v1", "MountainCar-v0", "Catch-bsuite",
                 "Breakout-MinAtar", "Asterix-MinAtar", "Freeway-MinAtar",
                 "SpaceInvaders-MinAtar", "DeepSea-bsuite")


def make_env(name: str):
    """Returns (env, env_params, num_actions, obs_shape) for a discrete gymnax environment."""
    if name not in DISCRETE_ENVS:
        raise UserError(f"unknown or non-discrete environment {name!r}; "
                        f"choose one of {', '.join(DISCRETE_ENVS)}")
    env, params = gymnax.make(name)
    num_actions = int(env.action_space(params).n)
    obs_shape = tuple(env.observation_space(params).shape)
    return env, params, num_actions, obs_shape
