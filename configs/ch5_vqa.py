"""Chapter 5: a tiny VLM (CLIP patch tokens as the GPT's prefix) vs late fusion, VQA on the scenes.

python -m jaxcourse.ch5 --config=configs/ch5_vqa.py:cpu
Presets: smoke (seconds), cpu (CLIP 400 steps, the VLM 800, the late-fusion MLP 1,000, on 2,000
training scenes; measured 939 s wall, 599 s of CPU time, on 2 cores shared at load 5-7), gpu
(20,000 scenes, a 4-layer GPT; not run yet). Unfreeze the image tower:
--config.vlm.train_vit=True.
"""
from jaxcourse.vision.configs import vqa_config


def get_config(preset: str = "cpu"):
    return vqa_config(preset)
