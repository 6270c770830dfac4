"""The image-classification task for the shared loop, with chapter 2's regularizers, and the
train / val / test splits and one fit of it that chapters 2 and 5 share."""
import dataclasses
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxcourse.data import pipeline, sources
from jaxcourse.errors import UserError
from jaxcourse.train import Task, evaluate, train
from jaxcourse.train.step import make_eval_fn
from jaxcourse.vision import augment


@dataclasses.dataclass(frozen=True)
class Regularization:
    label_smoothing: float = 0.0
    mixup_alpha: float = 0.0    # 0 = off
    cutmix_alpha: float = 0.0   # 0 = off; with both on, each batch picks one at random
    crop_pad: int = 0           # random-crop padding in pixels; 0 = off
    flip: bool = False          # horizontal flips (right for CIFAR, wrong for digits)


def classification_task(model: nn.Module, reg: Regularization, num_classes: int) -> Task:
    """Batches are {"image": [B, H, W, C] float, "label": [B] int}."""

    def init(rng, batch):
        variables = model.init({"params": rng, "dropout": rng}, batch["image"], train=False)
        variables = dict(variables)
        params = variables.pop("params")
        return params, variables

    def regularize(rng, x, y):
        k_aug, k_mix, k_which = jax.random.split(rng, 3)
        if reg.crop_pad > 0 or reg.flip:
            x = augment.random_crop_flip(k_aug, x, reg.crop_pad, reg.flip)
        if reg.mixup_alpha > 0 and reg.cutmix_alpha > 0:
            xm, ym = augment.mixup(k_mix, x, y, reg.mixup_alpha)
            xc, yc = augment.cutmix(k_mix, x, y, reg.cutmix_alpha)
            pick = jax.random.bernoulli(k_which)
            x, y = jnp.where(pick, xm, xc), jnp.where(pick, ym, yc)
        elif reg.mixup_alpha > 0:
            x, y = augment.mixup(k_mix, x, y, reg.mixup_alpha)
        elif reg.cutmix_alpha > 0:
            x, y = augment.cutmix(k_mix, x, y, reg.cutmix_alpha)
        return x, y

    def loss(params, model_state, batch, rng, train):
        x, labels = batch["image"], batch["label"]
        targets = jax.nn.one_hot(labels, num_classes)
        k_reg, k_drop = jax.random.split(rng)
        if train:
            x, targets = regularize(k_reg, x, targets)
            targets = optax.smooth_labels(targets, reg.label_smoothing)
        variables = {"params": params, **model_state}
        if train and model_state:
            logits, new_state = model.apply(variables, x, train=True,
                                            rngs={"dropout": k_drop}, mutable=list(model_state))
        else:
            logits = model.apply(variables, x, train=train, rngs={"dropout": k_drop})
            new_state = model_state
        logits = logits.astype(jnp.float32)
        loss = optax.softmax_cross_entropy(logits, targets).mean()
        accuracy = (logits.argmax(-1) == labels).mean()
        return loss, ({"accuracy": accuracy}, new_state)

    return Task(init=init, loss=loss)


def splits(cfg) -> dict[str, dict[str, np.ndarray]]:
    """train / val (held out of train, for eval and early stopping) / test of cfg.data;
    cfg.val_fraction of the training images are the val split."""
    data = sources.load_images(cfg.data)
    n_val = int(len(data["x_train"]) * cfg.val_fraction)
    x, y = data["x_train"], data["y_train"]
    return {
        "train": {"image": x[n_val:], "label": y[n_val:]},
        "val": {"image": x[:n_val], "label": y[:n_val]},
        "test": {"image": data["x_test"], "label": data["y_test"]},
    }


def subset(split: dict, fraction: float, seed: int, key: str = "compare.fractions") -> dict:
    """The first round(fraction * n) examples (at least 1) of a fixed shuffle of a split;
    `key` names the config entry in the error for a fraction outside (0, 1]."""
    if not 0.0 < fraction <= 1.0:
        raise UserError(f"{key} entries must be in (0, 1], got {fraction}")
    n = len(split["label"])
    keep = np.sort(np.random.default_rng(seed).permutation(n)[:max(1, round(fraction * n))])
    return {k: v[keep] for k, v in split.items()}


def with_pretrained(task: Task, pretrained: dict) -> Task:
    """`task` whose fresh parameters have the top-level subtrees of `pretrained` swapped in
    (e.g. {"vit": encoder params}): fine-tuning and linear probes start from them."""

    def init(rng, batch):
        params, model_state = task.init(rng, batch)
        missing = set(pretrained) - set(params)
        if missing:
            raise ValueError(f"pretrained subtrees {sorted(missing)} are not in the model")
        return {**params, **pretrained}, model_state

    return dataclasses.replace(task, init=init)


def fit(model: nn.Module, cfg, workdir: pathlib.Path, data: dict, num_classes: int,
        pretrained: dict | None = None):
    """Trains `model` with the shared loop (regularizers from cfg.reg) on data["train"],
    evaluating on data["val"]; returns (state, metrics with val/test accuracy). `pretrained`:
    parameter subtrees that replace the fresh ones before training (`with_pretrained`)."""
    task = classification_task(model, Regularization(**cfg.reg.to_dict()), num_classes)
    if pretrained is not None:
        task = with_pretrained(task, pretrained)
    train_data = pipeline.batches(data["train"], cfg.train.batch_size, cfg.train.seed)
    val = pipeline.eval_batches(data["val"], cfg.eval_batch_size)
    state, metrics = train(task, cfg, workdir, train_data, val)
    test = evaluate(make_eval_fn(task, cfg.train.seed), state.params, state.model_state,
                    pipeline.eval_batches(data["test"], cfg.eval_batch_size))
    return state, {**metrics, "val_accuracy": metrics["eval/accuracy"],
                   "test_accuracy": test["accuracy"], "test_loss": test["loss"]}
