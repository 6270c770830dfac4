"""Optimizers and learning-rate schedules from the `optimizer` config section (optax).

`make_optimizer(c, total_steps)` builds the whole transformation: clipping, weight decay with
its mask, the named optimizer with its schedule and, when the config asks for them, frozen
parameters and parameter groups (paths are the '/'-joined keys, e.g. "blocks/layer_0/mlp/up/kernel"):

    optimizer.frozen = "^base/|embed"            # regex: matching params get zero updates and
                                                 # no optimizer state (optax.set_to_zero)
    optimizer.groups = "/b$:lr=4; ^head/:wd=0"   # ';'-separated REGEX:SETTINGS, the first
                                                 # matching entry wins; SETTINGS is lr=<lr
                                                 # multiplier> and/or wd=<weight decay>

Both empty (the default) give the plain chain, exactly as without them. The learning rate is
an injected hyper-parameter (optax.inject_hyperparams), so `learning_rate(opt_state)` reads
the value the optimizer used from its own state.
"""
import dataclasses
import re

import jax
import optax

from jaxcourse.errors import ConfigError

SCHEDULES = ("constant", "warmup_cosine", "onecycle", "linear")
OPTIMIZERS = ("sgd", "momentum", "nesterov", "adam", "adamw", "lion", "adafactor", "muon")
DECOUPLED = ("adamw", "lion", "muon")  # optimizers with their own (decoupled) weight decay


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


def path_str(keys) -> str:
    """'/'-joined names of a pytree key path: dict keys, attribute names, sequence indices."""
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
                    for k in keys)


@dataclasses.dataclass(frozen=True)
class Group:
    pattern: str
    lr_mult: float = 1.0
    weight_decay: float | None = None  # None: optimizer.weight_decay


def _regex(key: str, pattern: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ConfigError(f"config key {key}: {pattern!r} is not a regex ({e})") from e


def parse_groups(text: str) -> list[Group]:
    """`optimizer.groups` ("REGEX:lr=4,wd=0; REGEX2:wd=0.1") as Groups, in order."""
    groups = []
    for entry in filter(None, (e.strip() for e in text.split(";"))):
        pattern, sep, settings = entry.rpartition(":")
        if not sep or not pattern.strip():
            raise ConfigError(f"config key optimizer.groups: {entry!r} is not REGEX:lr=X,wd=Y")
        _regex("optimizer.groups", pattern.strip())
        values = {}
        for item in settings.split(","):
            name, eq, value = (s.strip() for s in item.partition("="))
            try:
                number = float(value)
            except ValueError:
                number = -1.0
            if name not in ("lr", "wd") or not eq or number < 0:
                raise ConfigError(f"config key optimizer.groups: {item.strip()!r} in {entry!r} "
                                  "is not lr=<multiplier> or wd=<weight decay> (numbers >= 0)")
            values[name] = number
        groups.append(Group(pattern.strip(), values.get("lr", 1.0), values.get("wd")))
    return groups


def param_labels(c, params):
    """Each parameter's optimizer label: "frozen", "group<i>" (first matching group) or
    "default". A frozen pattern or group that matches no parameter is a ConfigError."""
    frozen = c.get("frozen", "")
    frozen_re = _regex("optimizer.frozen", frozen) if frozen else None
    groups = parse_groups(c.get("groups", ""))
    regexes = [re.compile(g.pattern) for g in groups]
    used = set()

    def label(keys, _):
        path = path_str(keys)
        if frozen_re is not None and frozen_re.search(path):
            used.add("frozen")
            return "frozen"
        for i, regex in enumerate(regexes):
            if regex.search(path):
                used.add(f"group{i}")
                return f"group{i}"
        return "default"

    labels = jax.tree_util.tree_map_with_path(label, params)
    if frozen_re is not None and "frozen" not in used:
        raise ConfigError(f"config key optimizer.frozen={frozen!r} matches no parameter")
    for i, g in enumerate(groups):
        if f"group{i}" not in used:
            raise ConfigError(f"config key optimizer.groups: {g.pattern!r} matches no "
                              "(unfrozen, not earlier grouped) parameter")
    return labels


def frozen_mask(c, params):
    """True for every parameter `optimizer.frozen` freezes; None when nothing is frozen."""
    if not c.get("frozen", ""):
        return None
    return jax.tree.map(lambda label: label == "frozen", param_labels(c, params))


def _named(c, lr, wd: float) -> optax.GradientTransformation:
    """The optimizer `c.name` at learning rate `lr` with decoupled weight decay `wd`."""
    if c.name in ("sgd", "momentum", "nesterov"):
        momentum = None if c.name == "sgd" else c.momentum
        return optax.sgd(lr, momentum=momentum, nesterov=c.name == "nesterov")
    if c.name == "adam":
        return optax.adam(lr, b1=c.b1, b2=c.b2)
    if c.name == "adamw":
        return optax.adamw(lr, b1=c.b1, b2=c.b2, weight_decay=wd, mask=decay_mask)
    if c.name == "lion":
        return optax.lion(lr, b1=c.b1, b2=c.b2, weight_decay=wd, mask=decay_mask)
    if c.name == "adafactor":
        return optax.adafactor(lr)
    if c.name == "muon":
        muon = optax.contrib.muon(lr, adam_b1=c.b1, adam_b2=c.b2, weight_decay=wd,
                                  weight_decay_mask=decay_mask)
        return optax.chain(muon, _decay_kernels_muon_skips(lr, wd)) if wd else muon
    raise ConfigError(
        f"config key optimizer.name={c.name!r} is not one of {', '.join(OPTIMIZERS)}")


def _decay_kernels_muon_skips(lr, wd: float) -> optax.GradientTransformation:
    """optax's muon orthogonalizes 2-D kernels only; kernels of other ranks (attention
    [D, H, Dh], scanned [L, ...] layers, convolutions) go to its Adam part, whose decay is 0.
    Decay those here, decoupled as in AdamW (-lr * wd * p); vectors stay undecayed."""
    def update(updates, state, params):
        return jax.tree.map(lambda u, p: u - lr * wd * p if p.ndim > 2 else u,
                            updates, params), state
    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def _decayed(c, schedule, wd: float) -> list[optax.GradientTransformation]:
    """[coupled L2 decay (optimizers without a decoupled form), the scheduled optimizer]."""
    coupled, decoupled = (0.0, wd) if c.name in DECOUPLED else (wd, 0.0)
    _named(c, 0.0, decoupled)  # a bad name fails here, not inside optax's init
    core = optax.inject_hyperparams(
        lambda learning_rate: _named(c, learning_rate, decoupled))(learning_rate=schedule)
    if coupled > 0:
        return [optax.add_decayed_weights(coupled, mask=decay_mask), core]
    return [core]


def make_optimizer(c, total_steps: int) -> optax.GradientTransformation:
    """The optimizer named by `c.name`, with schedule, decay mask, clipping, and the frozen
    parameters and groups of `c.frozen` / `c.groups` (see the module docstring)."""
    schedule = make_schedule(c, total_steps)
    groups = parse_groups(c.get("groups", ""))
    if c.get("frozen", ""):
        _regex("optimizer.frozen", c.frozen)
    clip = [optax.clip_by_global_norm(c.clip_norm)] if c.clip_norm > 0 else []
    if not groups and not c.get("frozen", ""):
        return optax.chain(*clip, *_decayed(c, schedule, c.weight_decay))
    # "default" sorts first among the labels, so `learning_rate` reports the base group's.
    transforms = {"default": optax.chain(*_decayed(c, schedule, c.weight_decay))}
    for i, g in enumerate(groups):
        lr = schedule if g.lr_mult == 1.0 else (lambda s, m=g.lr_mult: m * schedule(s))
        wd = c.weight_decay if g.weight_decay is None else g.weight_decay
        transforms[f"group{i}"] = optax.chain(*_decayed(c, lr, wd))
    if c.get("frozen", ""):
        transforms["frozen"] = optax.set_to_zero()
    # Clipping stays outside the groups: the norm is over every trainable gradient.
    return optax.chain(*clip, optax.multi_transform(transforms, lambda p: param_labels(c, p)))


def _injected(node) -> bool:
    return "learning_rate" in (getattr(node, "hyperparams", None) or {})


def learning_rate(opt_state):
    """The learning rate of the optimizer's last update, from its state (the first injected
    `learning_rate`: with groups, the default group's); None if none is injected."""
    for node in jax.tree.leaves(opt_state, is_leaf=_injected):
        if _injected(node):
            return node.hyperparams["learning_rate"]
    return None
