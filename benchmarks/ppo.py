"""PPO on CartPole-v1, ours vs purejaxrl, side by side in one process (CPU).

    python benchmarks/ppo.py                                 # ours only
    python benchmarks/ppo.py --purejaxrl=/path/to/purejaxrl  # both (path holds ppo.py)
    python benchmarks/ppo.py --seeds=1,8,64                  # vmapped agents per compile

The config is purejaxrl's CartPole default: 5e5 steps, 4 envs x 128 steps, 4 epochs x 4
minibatches, lr 2.5e-4 annealed. purejaxrl is loaded from the given checkout at run time
(nothing of it is copied here); it needs `distrax` importable (e.g. via PYTHONPATH). Its
wrappers import brax and navix for other environments: we register empty stand-ins for
those, and adapt gymnax 1.0.1's (terminated, truncated) step to the older single `done`.
Compile and run are timed separately; runs are repeated and the best time is kept.
"""
import argparse
import importlib.util
import sys
import time
import types

import jax
import jax.numpy as jnp
import numpy as np

from jaxcourse.rl.envs import gymnax
from jaxcourse.rl.ppo import Coefs, PPOConfig, make_train

PJX_CONFIG = {
    "LR": 2.5e-4, "NUM_ENVS": 4, "NUM_STEPS": 128, "TOTAL_TIMESTEPS": 5e5,
    "UPDATE_EPOCHS": 4, "NUM_MINIBATCHES": 4, "GAMMA": 0.99, "GAE_LAMBDA": 0.95,
    "CLIP_EPS": 0.2, "ENT_COEF": 0.01, "VF_COEF": 0.5, "MAX_GRAD_NORM": 0.5,
    "ACTIVATION": "tanh", "ENV_NAME": "CartPole-v1", "ANNEAL_LR": True, "DEBUG": False,
}


def timed(fn, *args, repeats: int):
    """(compile seconds, (best run wall seconds, best run CPU seconds), outputs).

    CPU seconds (this process, all threads) are reported beside wall time because a shared
    machine's load inflates wall time; both implementations run interleaved in one process."""
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - t0
    best, best_cpu = float("inf"), float("inf")
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        out = jax.block_until_ready(compiled(*args))
        best = min(best, time.perf_counter() - t0)
        best_cpu = min(best_cpu, time.process_time() - c0)
    return compile_s, (best, best_cpu), out


class _OldStepAPI:
    """gymnax >= 1.0 returns (obs, state, r, terminated, truncated, info); purejaxrl
    expects (obs, state, r, done, info)."""

    def __init__(self, env):
        self._env = env

    def __getattr__(self, name):
        return getattr(self._env, name)

    def step(self, key, state, action, params=None):
        obs, state, r, term, trunc, info = self._env.step(key, state, action, params)
        return obs, state, r, jnp.logical_or(term, trunc), info


def load_purejaxrl(path: str):
    for name in ("brax", "brax.envs", "brax.envs.wrappers", "brax.envs.wrappers.training",
                 "navix"):
        mod = sys.modules.setdefault(name, types.ModuleType(name))
        mod.EpisodeWrapper = mod.AutoResetWrapper = object
    sys.path.insert(0, path)
    spec = importlib.util.spec_from_file_location("purejaxrl_ppo", f"{path}/ppo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    make = lambda name, **kw: (lambda e, p: (_OldStepAPI(e), p))(*gymnax.make(name, **kw))
    module.gymnax = types.SimpleNamespace(make=make)  # only purejaxrl sees the old API
    return module


def bench_ours(seeds: int, repeats: int):
    cfg = PPOConfig(bootstrap_truncation=False)  # purejaxrl's semantics, same work
    fns = make_train(cfg)
    coefs = Coefs.make()
    if seeds == 1:
        c, r, (_, m) = timed(fns.train, jnp.asarray(0), coefs, repeats=repeats)
    else:
        batched = jax.vmap(fns.train, in_axes=(0, None))
        c, r, (_, m) = timed(batched, jnp.arange(seeds), coefs, repeats=repeats)
    final = float(np.asarray(m["return"])[..., -10:].mean())
    return c, r, final, cfg.total_timesteps * seeds


def bench_purejaxrl(module, seeds: int, repeats: int):
    train = module.make_train(dict(PJX_CONFIG))
    keys = jax.random.split(jax.random.PRNGKey(0), seeds)
    fn = train if seeds == 1 else jax.vmap(train)
    c, r, out = timed(fn, keys[0] if seeds == 1 else keys, repeats=repeats)
    ret = np.asarray(out["metrics"]["returned_episode_returns"])
    final = float(ret[..., -10:, :, :].mean())
    return c, r, final, int(PJX_CONFIG["TOTAL_TIMESTEPS"]) * seeds


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--purejaxrl", default="", help="folder holding purejaxrl's ppo.py")
    ap.add_argument("--seeds", default="1,8", help="comma-separated agent counts")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    impls = [("jaxcourse", bench_ours)]
    if args.purejaxrl:
        module = load_purejaxrl(args.purejaxrl)
        impls.append(("purejaxrl", lambda s, r: bench_purejaxrl(module, s, r)))
    print(f"jax {jax.__version__}, {jax.devices()[0].platform}")
    print("| impl | agents | compile s | run s (wall) | run s (CPU) | env steps/s (wall) | "
          "CPU s per agent | final return |")
    print("|---|---|---|---|---|---|---|---|")
    for seeds in [int(s) for s in args.seeds.split(",")]:
        for name, fn in impls:
            c, (r, cpu), final, steps = fn(seeds, args.repeats)
            print(f"| {name} | {seeds} | {c:.1f} | {r:.2f} | {cpu:.2f} | {steps / r:,.0f} | "
                  f"{cpu / seeds:.2f} | {final:.1f} |", flush=True)


if __name__ == "__main__":
    main()
