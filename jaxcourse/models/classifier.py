"""Image classifiers for chapter 2: MLP, plain CNN and ResNet (He et al. 2016, basic block).

One frozen config for the family; `stages=(2, 2, 2, 2)` with `width=64` is ResNet-18.
All take images [B, H, W, C] and return logits [B, num_classes]; `train` switches dropout
and batch statistics.
"""
import dataclasses
from functools import partial

import flax.linen as nn
import jax.numpy as jnp

from jaxcourse.errors import UserError
from jaxcourse.models.batchnorm import BatchNorm


@dataclasses.dataclass(frozen=True)
class ClassifierConfig:
    arch: str = "resnet"         # mlp | cnn | resnet
    num_classes: int = 10
    width: int = 32              # first stage / hidden width
    stages: tuple[int, ...] = (1, 1, 1)  # resnet: blocks per stage (width doubles per stage)
    depth: int = 2               # mlp / cnn: hidden layers
    dropout: float = 0.0
    norm: str = "batchnorm"      # batchnorm (flax) | scratch (ours) | none


def _norm(cfg: ClassifierConfig, train: bool):
    if cfg.norm == "batchnorm":
        return nn.BatchNorm(use_running_average=not train, momentum=0.9)
    if cfg.norm == "scratch":
        return BatchNorm(use_running_average=not train, momentum=0.9)
    if cfg.norm == "none":
        return lambda x: x
    raise UserError(f"unknown model.norm={cfg.norm!r}; use batchnorm, scratch or none")


class MLP(nn.Module):
    cfg: ClassifierConfig

    @nn.compact
    def __call__(self, x_BxHxWxC, train: bool = False):
        x = x_BxHxWxC.reshape(x_BxHxWxC.shape[0], -1)
        for _ in range(self.cfg.depth):
            x = nn.Dense(self.cfg.width)(x)
            x = nn.relu(_norm(self.cfg, train)(x))
            x = nn.Dropout(self.cfg.dropout, deterministic=not train)(x)
        return nn.Dense(self.cfg.num_classes)(x)


class CNN(nn.Module):
    cfg: ClassifierConfig

    @nn.compact
    def __call__(self, x, train: bool = False):
        for i in range(self.cfg.depth):
            x = nn.Conv(self.cfg.width * 2 ** i, (3, 3), use_bias=self.cfg.norm == "none")(x)
            x = nn.relu(_norm(self.cfg, train)(x))
            if min(x.shape[1:3]) >= 4:
                x = nn.max_pool(x, (2, 2), (2, 2))
        x = x.mean((1, 2))
        x = nn.Dropout(self.cfg.dropout, deterministic=not train)(x)
        return nn.Dense(self.cfg.num_classes)(x)


class BasicBlock(nn.Module):
    cfg: ClassifierConfig
    features: int
    stride: int

    @nn.compact
    def __call__(self, x, train: bool):
        conv = partial(nn.Conv, use_bias=self.cfg.norm == "none")
        y = conv(self.features, (3, 3), self.stride)(x)
        y = nn.relu(_norm(self.cfg, train)(y))
        y = conv(self.features, (3, 3))(y)
        y = _norm(self.cfg, train)(y)
        if x.shape != y.shape:  # projection shortcut when the shape changes.
            x = _norm(self.cfg, train)(conv(self.features, (1, 1), self.stride)(x))
        return nn.relu(x + y)


class ResNet(nn.Module):
    cfg: ClassifierConfig

    @nn.compact
    def __call__(self, x, train: bool = False):
        cfg = self.cfg
        x = nn.Conv(cfg.width, (3, 3), use_bias=cfg.norm == "none")(x)
        x = nn.relu(_norm(cfg, train)(x))
        for i, blocks in enumerate(cfg.stages):
            for j in range(blocks):
                stride = 2 if (i > 0 and j == 0 and min(x.shape[1:3]) >= 4) else 1
                x = BasicBlock(cfg, cfg.width * 2 ** i, stride)(x, train)
        x = x.mean((1, 2))
        x = nn.Dropout(cfg.dropout, deterministic=not train)(x)
        return nn.Dense(cfg.num_classes, dtype=jnp.float32)(x)


ARCHS = {"mlp": MLP, "cnn": CNN, "resnet": ResNet}


def build_classifier(cfg: ClassifierConfig) -> nn.Module:
    if cfg.arch not in ARCHS:
        raise UserError(f"unknown model.arch={cfg.arch!r}; use one of {', '.join(ARCHS)}")
    return ARCHS[cfg.arch](cfg)
