"""Reinforcement learning: PPO as one compiled function (gymnax), a gymnasium adapter,
and GRPO / reward models / PPO for a small language model (chapter 6)."""
