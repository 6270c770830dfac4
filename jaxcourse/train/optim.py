"""Optimizers and learning-rate schedules from the `optimizer` config section (optax)."""
import jax
import optax

from jaxcourse.errors import ConfigError

SCHEDULES = ("constant", "warmup_cosine", "onecycle", "linear")
OPTIMIZERS = ("sgd", "momentum", "nesterov", "adam", "adamw", "lion", "adafactor", "muon")


def make_schedule(c, total_steps: int) -> optax.Schedule:
    lr, warm = c.lr, min(c.warmup_steps, max(total_steps - 1, 0))
    if c.schedule == "constant":
        if warm == 0:
            return optax.constant_schedule(lr)
        return optax.join_schedules(
            [optax.linear_schedule(0.0, lr, warm), optax.constant_schedule(lr)], [warm])
    if c.schedule == "warmup_cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0, lr, warm, max(total_steps, warm + 1), end_value=lr * c.min_lr_ratio)
    if c.schedule == "onecycle":
        return optax.cosine_onecycle_schedule(max(total_steps, 1), lr)
    if c.schedule == "linear":
        decay = optax.linear_schedule(lr, lr * c.min_lr_ratio, max(total_steps - warm, 1))
        if warm == 0:
            return decay
        return optax.join_schedules([optax.linear_schedule(0.0, lr, warm), decay], [warm])
    raise ConfigError(
        f"config key optimizer.schedule={c.schedule!r} is not one of {', '.join(SCHEDULES)}")


def decay_mask(params):
    """Weight decay applies to matrices and kernels, never to biases or norm scales."""
    return jax.tree.map(lambda p: p.ndim > 1, params)


def make_optimizer(c, total_steps: int) -> optax.GradientTransformation:
    """The optimizer named by `c.name`, with schedule, decay mask and clipping."""
    lr, wd = make_schedule(c, total_steps), c.weight_decay
    if c.name in ("sgd", "momentum", "nesterov"):
        momentum = None if c.name == "sgd" else c.momentum
        core = optax.sgd(lr, momentum=momentum, nesterov=c.name == "nesterov")
    elif c.name == "adam":
        core = optax.adam(lr, b1=c.b1, b2=c.b2)
    elif c.name == "adamw":
        core = optax.adamw(lr, b1=c.b1, b2=c.b2, weight_decay=wd, mask=decay_mask)
        wd = 0.0
    elif c.name == "lion":
        core = optax.lion(lr, b1=c.b1, b2=c.b2, weight_decay=wd, mask=decay_mask)
        wd = 0.0
    elif c.name == "adafactor":
        core = optax.adafactor(lr)
    elif c.name == "muon":
        core = optax.contrib.muon(lr, adam_b1=c.b1, adam_b2=c.b2, weight_decay=wd,
                                  weight_decay_mask=decay_mask)
        wd = 0.0
    else:
        raise ConfigError(
            f"config key optimizer.name={c.name!r} is not one of {', '.join(OPTIMIZERS)}")
    parts = []
    if c.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(c.clip_norm))
    if wd > 0:  # coupled L2 decay for optimizers without a decoupled form.
        parts.append(optax.add_decayed_weights(wd, mask=decay_mask))
    return optax.chain(*parts, core)
