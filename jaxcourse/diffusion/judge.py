"""The quality judge: chapter 2's classifier, trained on the same data as the diffusion model.

Hyper-parameters come from chapter 2's own config file (same preset), so the judge is the
chapter 2 model, not a second classifier written for chapter 8. Its features (the input of
its last Dense layer) are the space the Fréchet distance is measured in.
"""
from __future__ import annotations

import dataclasses
import pathlib

import numpy as np

from jaxcourse import config as config_lib
from jaxcourse.data import pipeline
from jaxcourse.diffusion.metrics import make_judge
from jaxcourse.models.classifier import ClassifierConfig, build_classifier
from jaxcourse.train import train
from jaxcourse.vision.task import Regularization, classification_task


def judge_config(spec: str, data_cfg, steps: int = 0, width: int = 0, arch: str = ""):
    """Chapter 2's config `spec` ("configs/ch2_digits.py:cpu"), on this chapter's data;
    `steps` / `width` > 0 and a non-empty `arch` replace chapter 2's values."""
    jc, _, _ = config_lib.load(spec)
    jc.data = data_cfg.to_dict()
    jc.train.patience = 0
    if steps > 0:
        jc.train.steps = steps
    if width > 0:
        jc.model.width = width
    if arch:
        jc.model.arch = arch
    jc.checkpoint.keep = 1
    return jc


def train_judge(jc, workdir: pathlib.Path, data: dict[str, np.ndarray]):
    """Trains (or resumes) the classifier; returns (judge fn, test accuracy of real images).

    `data` holds x_train / y_train / x_test / y_test with images in [0, 1].
    """
    num_classes = int(data["y_train"].max()) + 1
    model_cfg = ClassifierConfig(**jc.model.to_dict(), num_classes=num_classes)
    model_cfg = dataclasses.replace(model_cfg, stages=tuple(model_cfg.stages))
    model = build_classifier(model_cfg)
    task = classification_task(model, Regularization(**jc.reg.to_dict()), num_classes)
    train_data = pipeline.batches({"image": data["x_train"], "label": data["y_train"]},
                                  jc.train.batch_size, jc.train.seed)
    state, _ = train(task, jc, workdir, train_data)
    judge = make_judge(model, {"params": state.params, **state.model_state})
    logits, _ = judge(data["x_test"])  # held-out accuracy through the judge itself.
    return judge, float(np.mean(logits.argmax(-1) == data["y_test"]))
