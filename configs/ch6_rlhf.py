"""Chapter 6: RLHF on a tiny GPT: a reward model from preference pairs, PPO-LM on it, vs GRPO.

python -m jaxcourse.ch6 --config=configs/ch6_rlhf.py:cpu
Same task and SFT start as configs/ch6_grpo.py. A Bradley-Terry reward model is trained with
the shared loop on (right sum, wrong sum) pairs; PPO-LM (value model, GAE over tokens, KL
penalty to the SFT policy) optimizes its score; GRPO optimizes the rule reward with the same
samples per step. Both are judged by the rule reward. Presets: smoke, cpu, gpu.
"""
from jaxcourse.rl.configs import grpo_config


def get_config(preset: str = "cpu"):
    cfg = grpo_config(preset)
    cfg.experiment = "rlhf"
    cfg.rlhf = {"rm_steps": 300, "rm_eval_batches": 4, "ppo_steps": cfg.grpo.steps,
                "vf_coef": 0.5, "gae_lambda": 0.95}
    if preset == "smoke":
        cfg.rlhf.update(rm_steps=10, rm_eval_batches=1)
    return cfg
