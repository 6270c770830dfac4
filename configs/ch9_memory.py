"""Chapter 9: memory lab: the largest GPT under a per-device budget, with or without remat and bf16.

python -m jaxcourse.ch9 --config=configs/ch9_memory.py:cpu --config.lab.budget_mib=256
Nothing is trained: each probe compiles the shared loop's step from shapes and reads XLA's
memory analysis. Presets: smoke (tiny, for tests), cpu (4 layers, context 256, batch 16, single
device and FSDP over 8 simulated devices, 256 MiB), gpu (12 layers, context 1024, batch 16,
16 GiB). Writes memory.md and memory.png.
"""
from jaxcourse.parallel.configs import mesh_gpt_config


def get_config(preset: str = "cpu"):
    cfg = mesh_gpt_config(preset, "memory")
    # Width d_model = k * width_unit with one head per unit; k is searched in 1..max_width.
    cfg.lab = {
        "budget_mib": 256.0,
        "width_unit": 64,
        "max_width": 32,
        "vocab_size": 128,
        "layouts": "single,fsdp",
        "remat": "none,full",
        "precision": "float32,bfloat16",
    }
    cfg.model.update(context=256, n_layer=4)
    cfg.train.batch_size = 16
    cfg.train.steps_per_call = 1
    if preset == "smoke":
        cfg.lab.update(budget_mib=4.0, width_unit=16, max_width=2, layouts="single",
                       precision="float32")
        cfg.model.update(context=32)
        cfg.train.batch_size = 8
    elif preset == "gpu":
        cfg.lab.update(budget_mib=16384.0, width_unit=128, max_width=40, layouts="single")
        cfg.model.update(context=1024, n_layer=12, attention="cudnn")
        cfg.train.batch_size = 16
    return cfg
