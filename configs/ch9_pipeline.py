"""Chapter 9: GPipe vs 1F1B, both executed: bubble, activations in flight, memory vs microbatches.

python -m jaxcourse.ch9 --config=configs/ch9_pipeline.py:cpu
4 pipeline stages x 2-way data parallel on 8 simulated devices; each stage a residual MLP. For
M = 4, 8, 16, 32 microbatches: the schedules' bubble and peak activations in flight (simulated),
and XLA's temporaries for each compiled training step, with the two schedules' gradients
compared. Writes pipeline.md.
"""
from jaxcourse.parallel.configs import mesh_gpt_config
from jaxcourse.parallel.mesh import mesh_config


def get_config(preset: str = "cpu"):
    cfg = mesh_gpt_config(preset, "pipeline")
    # Residual-MLP stages, [rows, width] activations and a [width, hidden] layer per stage.
    cfg.mesh = mesh_config(pipeline=4, data=-1)
    cfg.lab = {"microbatches": "4,8,16,32", "rows": 8, "width": 128, "hidden": 1024}
    if preset == "smoke":
        cfg.lab.update(microbatches="4,8", width=16, hidden=64)
    return cfg
