"""Diffusion models: schedules, the denoising task, samplers, guidance, quality metrics."""
