"""Chapter 9: GPipe vs 1F1B, both executed: bubble, activations in flight, memory vs microbatches.

python -m jaxcourse.ch9 --config=configs/ch9_pipeline.py:cpu
4 pipeline stages x 2-way data parallel on 8 simulated devices; each stage a residual MLP. For
M = 4, 8, 16, 32 microbatches: the schedules' bubble and peak activations in flight (simulated),
and XLA's temporaries for each compiled training step, with the two schedules' gradients
compared. Writes pipeline.md.
"""
from jaxcourse.ch9 import chapter_config


def get_config(preset: str = "cpu"):
    return chapter_config(preset, "pipeline")
