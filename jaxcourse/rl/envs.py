"""Environments: gymnax (pure JAX, steps inside jit) behind one small constructor.

gymnax 1.0.1 imports `six` at package import time (only for its MNIST-bandit download
helper), and `six` is not a dependency of this project. When it is missing we register a
tiny stand-in module whose `urlretrieve` raises, so every other gymnax environment works.
"""
import sys
import types

from jaxcourse.errors import UserError


def _install_six_stub() -> None:
    try:
        import six  # noqa: F401
        return
    except ImportError:
        pass

    def urlretrieve(*args, **kwargs):
        raise RuntimeError("downloads are disabled: `six` is not installed")

    names = ["six", "six.moves", "six.moves.urllib", "six.moves.urllib.request"]
    mods = [types.ModuleType(n) for n in names]
    for parent, child in zip(mods, mods[1:]):
        setattr(parent, child.__name__.rsplit(".", 1)[1], child)
    mods[-1].urlretrieve = urlretrieve
    for m in mods:
        sys.modules.setdefault(m.__name__, m)


_install_six_stub()
import gymnax  # noqa: E402

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
