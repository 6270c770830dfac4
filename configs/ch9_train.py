"""Chapter 9: train the GPT once on any mesh (--config.mesh.data/fsdp/tensor/pipeline=N).

python -m jaxcourse.ch9 --config=configs/ch9_train.py:cpu --config.mesh.data=1 --config.mesh.fsdp=-1
Multi-host stand-in: python tpu_gpu_launch/local.py --processes 2 --devices-per-process 2 -- \
    python -m jaxcourse.ch9 --config=configs/ch9_train.py:smoke
Presets as in ch9_layouts.py; summary.json holds the per-step losses.
"""
from jaxcourse.parallel.configs import mesh_gpt_config


def get_config(preset: str = "cpu"):
    return mesh_gpt_config(preset, "train")
