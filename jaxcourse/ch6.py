"""Chapter 6: reinforcement learning: PPO as one compiled function, then GRPO on a small LM.

    python -m jaxcourse.ch6 --config=configs/ch6_ppo.py:cpu        # 8 PPO agents, CartPole-v1
    python -m jaxcourse.ch6 --config=configs/ch6_stress.py:cpu     # entropy x clip x KL grid
    python -m jaxcourse.ch6 --config=configs/ch6_gymnasium.py:cpu  # same agent, gymnasium env
    python -m jaxcourse.ch6 --config=configs/ch6_grpo.py:cpu       # GRPO on a tiny GPT
    python -m jaxcourse.ch6 --config=configs/ch6_rlhf.py:cpu       # reward model + PPO-LM vs GRPO

Lab: a whole PPO run (rollout, GAE, epochs of minibatch updates) is one `lax.scan` under
`jit`, so `vmap` trains a batch of agents (seeds, or a grid of loss coefficients) in one
compiled call; checkpoints fall between compiled chunks. The same update then trains from a
Python-stepped gymnasium environment. Last, the RLHF lesson on a GPT small enough for a
CPU: group-relative policy optimization against a rule-based reward, and a learned reward
model from preference pairs driving PPO for the LM.
"""
import dataclasses
import json
import pathlib
import time

import jax
import numpy as np

from jaxcourse import cli, config
from jaxcourse.errors import UserError
from jaxcourse.lm import lm_task, with_axis_names
from jaxcourse.models.transformer import gpt_config
from jaxcourse.rl import grpo, lm_ppo, lm_tasks, plots, reward_model
from jaxcourse.rl.grpo import GRPOConfig
from jaxcourse.rl.gym_adapter import train_gymnasium
from jaxcourse.rl.ppo import Coefs, PPOConfig, make_train
from jaxcourse.rl.runner import init_agents, train_agents
from jaxcourse.train import MetricsWriter, make_optimizer, train

COEF_KEYS = ("clip_eps", "ent_coef", "vf_coef", "kl_coef")


# ---------------------------------------------------------------------------------------
# Config sections (configs: jaxcourse.rl.configs and configs/ch6_*.py).

def ppo_parts(cfg):
    """(PPOConfig, Coefs) from the `ppo` section; bad values raise one-line UserErrors."""
    names = {f.name for f in dataclasses.fields(PPOConfig)}
    pc = PPOConfig(**{k: v for k, v in cfg.ppo.items() if k in names})
    coefs = Coefs.make(**{k: cfg.ppo[k] for k in COEF_KEYS})
    if cfg.ppo.num_seeds < 1:
        raise UserError(f"ppo.num_seeds={cfg.ppo.num_seeds} must be >= 1")
    return pc, coefs


def _final_metrics(metrics: dict, prefix: str = "") -> dict:
    last = {k: float(np.mean(v[:, -10:])) for k, v in metrics.items()}
    return {f"{prefix}{k}": last[k] for k in
            ("approx_kl", "clip_frac", "entropy", "value_loss", "explained_variance")}


# ---------------------------------------------------------------------------------------
# Experiments.

def run_ppo(cfg, workdir: pathlib.Path) -> dict:
    """`num_seeds` agents as one vmapped program, checkpointed every chunk of updates."""
    pc, coefs = ppo_parts(cfg)
    fns = make_train(pc, make_optimizer(cfg.optimizer, pc.grad_steps))
    seeds = cfg.train.seed + np.arange(cfg.ppo.num_seeds)
    runner = init_agents(fns, seeds, coefs)
    runner, metrics, timing = train_agents(fns, runner, pc.num_updates, cfg.checkpoint.every,
                                           workdir, keep=cfg.checkpoint.keep, log=print)
    MetricsWriter(workdir, resume_step=pc.num_updates).plot("curves.png", xlabel="PPO update")
    out = {"env": pc.env_name, "num_seeds": len(seeds), **timing}
    if metrics:  # empty when the run was already complete
        ret = metrics["return"]
        plots.return_curves(ret, workdir / "returns.png",
                            f"PPO on {pc.env_name}: {len(seeds)} seeds",
                            pc.num_envs * pc.num_steps)
        steps = ret.shape[1] * pc.num_envs * pc.num_steps * len(seeds)
        out.update(mean_return=float(ret[:, -10:].mean()),
                   worst_seed_return=float(ret[:, -10:].mean(1).min()),
                   steps_per_second=steps / max(timing["run_seconds"], 1e-9),
                   **_final_metrics(metrics))
    return out


def run_stress(cfg, workdir: pathlib.Path) -> dict:
    """The whole (entropy coef x clip range x KL coef x seed) grid as one vmapped program."""
    pc, _ = ppo_parts(cfg)
    s, n = cfg.stress, cfg.ppo.num_seeds
    grid = np.array(np.meshgrid(s.kl_coef, s.ent_coef, s.clip_eps, np.arange(n),
                                indexing="ij")).reshape(4, -1)
    kl, ent, clip, seed = grid
    coefs = Coefs.make(clip_eps=clip, ent_coef=ent, vf_coef=np.full_like(kl, cfg.ppo.vf_coef),
                       kl_coef=kl)
    fns = make_train(pc, make_optimizer(cfg.optimizer, pc.grad_steps))
    runner = init_agents(fns, cfg.train.seed + seed.astype(np.int32), coefs)
    _, metrics, timing = train_agents(fns, runner, pc.num_updates, cfg.checkpoint.every,
                                      log=print)
    shape = (len(s.kl_coef), len(s.ent_coef), len(s.clip_eps), n)
    final = metrics["return"][:, -10:].mean(1).reshape(shape).mean(-1)
    plots.stress_grid(final, s.kl_coef, s.ent_coef, s.clip_eps, workdir / "stress.png",
                      f"PPO {pc.env_name}, {pc.total_timesteps:,} steps, mean of {n} seeds")
    table = [{"kl_coef": k, "ent_coef": e, "clip_eps": c, "return": float(final[i, j, l])}
             for i, k in enumerate(s.kl_coef) for j, e in enumerate(s.ent_coef)
             for l, c in enumerate(s.clip_eps)]
    (workdir / "stress.json").write_text(json.dumps(table, indent=1) + "\n")
    best = max(table, key=lambda r: r["return"])
    worst = min(table, key=lambda r: r["return"])
    steps = metrics["return"].size * pc.num_envs * pc.num_steps
    return {"agents": int(grid.shape[1]), "best_return": best["return"],
            "best": json.dumps(best), "worst_return": worst["return"],
            "worst": json.dumps(worst), **timing,
            "steps_per_second": steps / max(timing["run_seconds"], 1e-9)}


def run_gymnasium(cfg, workdir: pathlib.Path) -> dict:
    """The same agent and jitted update, fed by gymnasium environments stepped in Python."""
    pc, coefs = ppo_parts(cfg)
    tx = make_optimizer(cfg.optimizer, pc.grad_steps)
    _, metrics, timing = train_gymnasium(pc, tx, coefs, cfg.train.seed, log=print)
    writer = MetricsWriter(workdir)
    for u in range(len(metrics["return"])):
        writer.write(u + 1, {k: v[u] for k, v in metrics.items()})
    writer.plot("curves.png", xlabel="PPO update")
    # Throughput over updates 2.. (the first one compiles).
    steps = (pc.num_updates - 1) * pc.num_envs * pc.num_steps
    total = timing["rollout_seconds"] * (pc.num_updates - 1) / pc.num_updates \
        + timing["learn_seconds"]
    return {"env": f"gymnasium:{pc.env_name}", "mean_return": float(metrics["return"][-10:].mean()),
            "steps_per_second": steps / max(total, 1e-9), **timing,
            **_final_metrics({k: v[None] for k, v in metrics.items()})}


def sft_start(cfg, workdir: pathlib.Path):
    """(model config, task, SFT params) from the shared loop on noisy-teacher data."""
    task = lm_tasks.AdditionTask(**cfg.task.to_dict())
    model_cfg = gpt_config(cfg.model)
    data = lm_tasks.SFTData(task, cfg.train.batch_size, cfg.train.seed)
    state, _ = train(lm_task(model_cfg), cfg, workdir / "sft", data)
    return model_cfg, task, state.params


def _rl_train(task, cfg, workdir: pathlib.Path, steps: int, inner_steps: int) -> tuple:
    """An RL phase through the shared loop (checkpoints, exact resume, metrics every step)
    with rl_optimizer, its schedule over all steps * inner_steps optimizer updates:
    (final params, wall seconds, last metrics row)."""
    tx = make_optimizer(cfg.rl_optimizer, steps * inner_steps)
    c = config.derive(cfg, {
        "optimizer": cfg.rl_optimizer,  # what tx is built from
        "train.steps": steps, "train.steps_per_call": 1, "train.log_every": 1,
        "train.eval_every": 0, "train.grad_accum": 1, "train.ema_decay": 0.0,
        "train.precision": "float32", "train.patience": 0})
    t0 = time.perf_counter()
    state, _ = train(task, c, workdir, [{}] * steps, tx=tx)
    seconds = time.perf_counter() - t0
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return state.params, seconds, {k.removeprefix("train/"): v for k, v in rows[-1].items()}


def _grpo_parts(cfg, model_cfg, task):
    names = {f.name for f in dataclasses.fields(GRPOConfig)}
    gc = GRPOConfig(**{k: v for k, v in cfg.grpo.items() if k in names})
    evaluate = lambda p: grpo.mean_reward(model_cfg, p, task, task.reward,
                                          jax.random.key(cfg.train.seed + 2),
                                          cfg.grpo.eval_samples, gc.temperature,
                                          gc.max_new_tokens)
    return gc, evaluate


def _grpo_task(cfg, model_cfg, gc, task, params):
    step = lambda tx: grpo.make_grpo_step(model_cfg, gc, task, task.reward, tx)  # noqa: E731
    # Boxed with the GPT's axis names: on an fsdp/tensor mesh the loop shards the policy.
    return grpo.policy_task(step, with_axis_names(model_cfg, params), params,
                            seed=cfg.train.seed + 1)


def run_grpo(cfg, workdir: pathlib.Path) -> dict:
    """GRPO from the SFT model: reward before and after, KL, clip fraction, length."""
    model_cfg, task, params = sft_start(cfg, workdir)
    gc, evaluate = _grpo_parts(cfg, model_cfg, task)
    before = evaluate(params)
    params, seconds, last = _rl_train(_grpo_task(cfg, model_cfg, gc, task, params), cfg,
                                      workdir, cfg.grpo.steps, gc.inner_steps)
    return {"reward_before": before, "reward_after": evaluate(params), "grpo_seconds": seconds,
            "final_kl": last["kl"], "final_clip_frac": last["clip_frac"],
            "final_response_length": last["response_length"]}


def _reward_model(cfg, model_cfg, task, workdir: pathlib.Path):
    """Bradley-Terry reward model trained with the shared loop; (params, held-out accuracy)."""
    rm_cfg = config.derive(cfg, {"train.steps": cfg.rlhf.rm_steps})
    data = reward_model.PreferenceData(task, cfg.train.batch_size, cfg.train.seed + 10)
    state, _ = train(reward_model.reward_model_task(model_cfg), rm_cfg, workdir / "reward_model",
                     data)
    params = state.params
    held_out = reward_model.PreferenceData(task, cfg.train.batch_size, cfg.train.seed + 99)
    acc = []
    for i in range(cfg.rlhf.rm_eval_batches):
        b = held_out[i]
        margin = (reward_model.sequence_reward(model_cfg, params, b["chosen"])
                  - reward_model.sequence_reward(model_cfg, params, b["rejected"]))
        acc.append(float((margin > 0).mean()))
    return params, float(np.mean(acc))


def run_rlhf(cfg, workdir: pathlib.Path) -> dict:
    """Reward model from preferences, PPO-LM on its score vs GRPO on the rule reward, both
    from the same SFT model with the same samples per step; judged by the true rule reward."""
    model_cfg, task, sft = sft_start(cfg, workdir)
    rm_params, rm_acc = _reward_model(cfg, model_cfg, task, workdir)
    gc, evaluate = _grpo_parts(cfg, model_cfg, task)
    before = evaluate(sft)
    out = {"reward_before": before, "reward_model_accuracy": rm_acc}
    # PPO-LM: policy and value model trained together; the value trunk starts from the RM.
    lc = lm_ppo.LMPPOConfig(batch_size=gc.prompts_per_step * gc.group_size,
                            max_new_tokens=gc.max_new_tokens, inner_steps=gc.inner_steps,
                            clip_eps=gc.clip_eps, kl_coef=gc.kl_coef, vf_coef=cfg.rlhf.vf_coef,
                            gae_lambda=cfg.rlhf.gae_lambda, temperature=gc.temperature)
    score = lambda idx, tokens: reward_model.sequence_reward(model_cfg, rm_params, tokens)
    ppo_task = grpo.policy_task(lambda tx: lm_ppo.make_lm_ppo_step(model_cfg, lc, task, score, tx),
                                (sft, rm_params), sft, seed=cfg.train.seed + 1)
    both, secs, last = _rl_train(ppo_task, cfg, workdir / "ppo_lm", cfg.rlhf.ppo_steps,
                                 lc.inner_steps)
    out.update(ppo_lm_reward_after=evaluate(both[0]), ppo_lm_seconds=secs,
               ppo_lm_final_kl=last["kl"])
    # GRPO on the rule reward, same start and sample budget.
    params, secs, last = _rl_train(_grpo_task(cfg, model_cfg, gc, task, sft), cfg,
                                   workdir / "grpo", cfg.grpo.steps, gc.inner_steps)
    out.update(grpo_reward_after=evaluate(params), grpo_seconds=secs,
               grpo_final_kl=last["kl"])
    return out


EXPERIMENTS = {"ppo": run_ppo, "stress": run_stress, "gymnasium": run_gymnasium,
               "grpo": run_grpo, "rlhf": run_rlhf}


def main(argv=None):
    cli.run_chapter("ch6", EXPERIMENTS, default_config="ch6_ppo", argv=argv)


if __name__ == "__main__":
    main()
