"""Chapter 6: GRPO on a tiny GPT: noisy-teacher SFT on single-digit sums, then RL on the exact reward.

python -m jaxcourse.ch6 --config=configs/ch6_grpo.py:cpu
Presets: smoke (seconds), cpu (sums of digits 0..4; 2x64 GPT, 400 SFT steps on a 30%-correct
teacher, 60 GRPO steps of 16 prompts x 8 completions), gpu (digits 0..9, more steps). summary.json holds
reward_before / reward_after (mean exact-answer reward, sampling at temperature 1).
"""
from jaxcourse.rl.configs import grpo_config


def get_config(preset: str = "cpu"):
    return grpo_config(preset)
