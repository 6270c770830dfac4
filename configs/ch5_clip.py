"""Chapter 5: CLIP (or SigLIP) on the generated scenes; zero-shot on held-out pairs, retrieval.

python -m jaxcourse.ch5 --config=configs/ch5_clip.py:cpu
Presets: smoke (seconds), cpu (about 7 minutes on 2 shared cores: 4,000 scenes, 600 steps, a
3-layer ViT and a 2-layer text tower), gpu (50,000 scenes, wider towers). SigLIP: --config.clip.loss=siglip.
"""
from jaxcourse.vision.configs import clip_config


def get_config(preset: str = "cpu"):
    return clip_config(preset)
