"""Chapter 5: every lab in one run (ViT vs CNN, CLIP, MAE, DINO, VQA), one summary.json.

The default of `python -m jaxcourse.ch5`: ViT vs CNN on the digits, CLIP on the generated
scenes, MAE and DINO on the digits, VQA on the scenes.

python -m jaxcourse.ch5                     # = --config=configs/ch5_all.py:cpu
Presets: smoke (what tests/test_ch5.py runs), cpu (each part's cpu preset; the whole run took
12.5 minutes on an idle 2-core CPU), gpu.
Each part is a section: --config.mae.train.steps=300, --config.parts=mae,dino.
"""
from jaxcourse.vision.configs import chapter_config


def get_config(preset: str = "cpu"):
    return chapter_config(preset)
