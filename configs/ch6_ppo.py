"""Chapter 6: PPO on CartPole-v1 (gymnax), 8 seeds trained at once as one compiled function.

python -m jaxcourse.ch6 --config=configs/ch6_ppo.py:cpu
Presets: smoke (seconds), cpu (purejaxrl's CartPole setting: 5e5 steps, 4 envs x 128 steps,
4 epochs x 4 minibatches, 8 seeds), gpu (256 seeds). Other environments:
--config.ppo.env_name=Acrobot-v1; the KL-penalty variant: --config.ppo.objective=kl
--config.ppo.kl_coef=1.0 --config.ppo.kl_target=0.01.
"""
from jaxcourse.rl.configs import ppo_config


def get_config(preset: str = "cpu"):
    return ppo_config(preset)
