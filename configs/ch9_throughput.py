"""Chapter 9: throughput math: FLOPs per token by hand, by 6N + 12LTd and by XLA, tokens/s and MFU.

python -m jaxcourse.ch9 --config=configs/ch9_throughput.py:cpu
Presets: smoke (tests), cpu (the small 4x128 GPT of chapters 3-4, context 64, batch 12;
peak = measured f32 matmul), gpu (GPT-2 small 12x768, context 1024, bf16, cuDNN attention; peak = data-sheet bf16).
"""
from jaxcourse.parallel.configs import mesh_gpt_config


def get_config(preset: str = "cpu"):
    cfg = mesh_gpt_config(preset, "throughput")
    cfg.lab = {"peak_matmul_size": 1024}
    # Unrolled layers: XLA's cost analysis counts a loop body once, not once per layer.
    cfg.model.update(scan_layers=False)
    cfg.train.steps = 60
    cfg.train.batch_size = 12
    cfg.train.steps_per_call = 10
    if preset == "smoke":
        cfg.lab.peak_matmul_size = 256
        cfg.model.n_layer = 2
        cfg.train.steps = 4
        cfg.train.batch_size = 8
        cfg.train.steps_per_call = 2
    elif preset == "gpu":  # GPT-2 small in bf16.
        cfg.model.update(dtype="bfloat16", attention="cudnn")
        cfg.train.precision = "bfloat16"
        cfg.train.batch_size = 16
        cfg.parallel.vocab_multiple = 128
    return cfg
