"""Chapter 2: a small ResNet on the embedded digits with batch norm, dropout, label smoothing, crops.

python -m jaxcourse.ch2 --config=configs/ch2_digits.py:cpu
CIFAR-10 (local folder with cifar-10-batches-py):
python -m jaxcourse.ch2 --config=configs/ch2_digits.py:gpu --config.data.path=/data/cifar10
"""
from jaxcourse.config import base_config


def get_config(preset: str = "cpu"):
    cfg = base_config()
    cfg.experiment = "classify"
    cfg.model = {"arch": "resnet", "width": 16, "stages": (1, 1, 1), "depth": 2,
                 "dropout": 0.1, "norm": "batchnorm"}
    cfg.reg = {"label_smoothing": 0.1, "mixup_alpha": 0.0, "cutmix_alpha": 0.0,
               "crop_pad": 1, "flip": False}
    cfg.eval_batch_size = 512
    cfg.val_fraction = 0.1
    t, o = cfg.train, cfg.optimizer
    # One step per call on CPU: XLA runs convolutions inside a scan several times slower.
    t.steps, t.batch_size, t.eval_every, t.log_every, t.steps_per_call = 400, 128, 100, 50, 1
    o.name, o.lr, o.schedule, o.weight_decay = "adamw", 3e-3, "onecycle", 5e-4
    if preset == "smoke":
        cfg.model.width, cfg.model.stages = 8, (1, 1)
        t.steps, t.batch_size, t.eval_every, t.log_every, t.steps_per_call = 20, 32, 10, 10, 1
    elif preset == "gpu":  # CIFAR-10 ResNet-18, aiming at 94% test accuracy.
        cfg.data.name = "cifar10"
        cfg.model.width, cfg.model.stages, cfg.model.dropout = 64, (2, 2, 2, 2), 0.0
        cfg.reg.crop_pad, cfg.reg.flip, cfg.reg.label_smoothing = 4, True, 0.2
        t.steps, t.batch_size, t.eval_every, t.log_every, t.steps_per_call = 4000, 512, 500, 100, 50
        t.precision = "bfloat16"
        o.name, o.lr, o.weight_decay = "nesterov", 0.2, 5e-4
    return cfg
