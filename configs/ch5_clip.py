"""Chapter 5: CLIP (or SigLIP) on the generated scenes; zero-shot vs probe and adapter, retrieval.

python -m jaxcourse.ch5 --config=configs/ch5_clip.py:cpu
Presets: smoke (seconds), cpu (7 minutes on 2 shared cores before the few-shot heads, 16 with them at load 5-7: 4,000 scenes, 600 steps, a
3-layer ViT and a 2-layer text tower), gpu (50,000 scenes, wider towers). SigLIP: --config.clip.loss=siglip.
"""
from jaxcourse.vision.configs import clip_config


def get_config(preset: str = "cpu"):
    return clip_config(preset)
