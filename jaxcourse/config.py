"""The one config system: ml_collections files, presets, and `--config.key=value` overrides.

A config file `configs/chN_<experiment>.py` defines `get_config(preset)` with presets
`smoke` (seconds, for tests), `cpu` (default) and `gpu`. `--config=` takes a path
(`configs/ch4_gpt.py:cpu`) or the short name of a shipped file (`ch4_gpt:cpu`). Overrides are
type-checked against the file's values: an unknown key or a wrong type raises `ConfigError`
naming the key.
"""
import ast
import importlib.util
import math
import pathlib
import re
import traceback
from collections.abc import Mapping
from typing import Any

import ml_collections

from jaxcourse.errors import ConfigError

PRESETS = ("smoke", "cpu", "gpu")
_PACKAGE = pathlib.Path(__file__).resolve().parent
# An installed wheel carries the files as jaxcourse/configs (see setup.py); a source checkout
# keeps them in the top-level configs/ folder.
CONFIG_DIR = _PACKAGE / "configs"
if not CONFIG_DIR.is_dir():
    CONFIG_DIR = _PACKAGE.parent / "configs"


def base_config() -> ml_collections.ConfigDict:
    """Sections and keys every experiment shares; a config file adds its own sections."""
    return ml_collections.ConfigDict({
        "experiment": "",  # the chapter's experiment function that runs this config.
        "train": {
            "steps": 1000,         # optimizer steps to train for (a rerun continues to it).
            "batch_size": 128,     # examples (or sequences) per optimizer step.
            "seed": 0,             # seeds init, data order and every random draw.
            "eval_every": 250,     # steps between evals on held-out data; 0 = only at the end.
            "log_every": 50,       # steps between rows of metrics.jsonl and progress lines.
            "steps_per_call": 1,   # K optimizer steps per compiled call (lax.scan).
            "grad_accum": 1,       # microbatches per optimizer step.
            "precision": "float32",  # or "bfloat16": params stay f32, compute in bf16.
            "ema_decay": 0.0,      # 0 = no EMA parameters.
            "patience": 0,         # early stopping: evals without a better eval loss; 0 = off.
            "profile_steps": "",   # "a:b": jax.profiler trace of steps a..b in workdir/profile.
        },
        "log": {
            "tensorboard": False,  # also write TensorBoard event files to workdir/tensorboard.
            "wandb": "",           # a W&B project name: also log there (needs wandb installed).
        },
        "optimizer": {
            "name": "adamw",  # sgd | momentum | nesterov | adam | adamw | lion | adafactor | muon
            "lr": 1e-3,  # peak learning rate.
            "schedule": "constant",  # constant | warmup_cosine | onecycle | linear
            "warmup_steps": 0,  # linear warmup from 0 to lr (warmup_cosine).
            "min_lr_ratio": 0.1,  # final lr / lr of the decaying schedules.
            "weight_decay": 0.0,  # decoupled (AdamW-style); never on biases and norm scales.
            "b1": 0.9,  # Adam / Lion first-moment decay.
            "b2": 0.999,  # Adam second-moment decay.
            "momentum": 0.9,  # momentum / nesterov coefficient.
            "clip_norm": 0.0,  # 0 = no clipping.
            # Regex over '/'-joined parameter paths: zero updates, no optimizer state.
            "frozen": "",
            # "REGEX:lr=4,wd=0; REGEX2:wd=0.1": per-group lr multiplier / weight decay
            # (train/optim.py); "" = one group.
            "groups": "",
        },
        "data": {
            # an embedded set (digits, stdlib, ...), mnist, cifar10, cifar100, tfds:NAME
            "name": "digits",
            "path": "",  # a local file or folder (any text file for the text chapters).
        },
        "checkpoint": {
            "every": 0,  # steps between checkpoints; 0 = only at the end.
            "keep": 3,  # how many recent checkpoints to keep.
        },
    })


def load(spec: str) -> tuple[ml_collections.ConfigDict, str, str]:
    """Loads `path[:preset]`; returns (config, experiment file stem, preset)."""
    path_str, _, preset = spec.partition(":")
    preset = preset or "cpu"
    path = resolve(path_str)
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r} for {path_str}; choose one of {', '.join(PRESETS)}")
    spec_ = importlib.util.spec_from_file_location(f"jaxcourse_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec_)
    try:
        spec_.loader.exec_module(module)
        if not hasattr(module, "get_config"):
            raise ConfigError(f"{path_str} defines no get_config(preset)")
        cfg = module.get_config(preset)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - the user's file: one line with file:line.
        raise ConfigError(_where(e, path)) from None
    return cfg, path.stem, preset


def _where(error: Exception, path: pathlib.Path) -> str:
    """`file:line: SyntaxError: message` for an error raised by (or in) a config file: the
    line in the user's file, not the import machinery's traceback."""
    if isinstance(error, SyntaxError):
        return f"{error.filename}:{error.lineno}: SyntaxError: {error.msg}"
    frames = [f for f in traceback.extract_tb(error.__traceback__)
              if pathlib.Path(f.filename).resolve() == path.resolve()]
    line = f"{path}:{frames[-1].lineno}" if frames else str(path)
    text = str(error).splitlines()[0] if str(error) else ""
    return f"{line}: {type(error).__name__}: {text}"


# Ranges of numeric keys, by the key's last name (any section: train.batch_size,
# finetune.batch_size, lm.eval_batch_size, ...); the first matching rule applies.
_RANGES = (
    (r"log_every|steps_per_call|grad_accum|keep", lambda v: v >= 1, ">= 1"),
    (r"warmup_steps|\w*every|patience|seed|weight_decay|clip_norm|\w*_weight",
     lambda v: v >= 0, ">= 0"),
    (r"\w*batch_size|\w*steps|\w*_batches", lambda v: v >= 1, ">= 1"),
    (r"lr", lambda v: v > 0, "> 0"),
    (r"ema_decay|b1|b2|momentum|dropout\w*", lambda v: 0 <= v < 1, "in [0, 1)"),
    (r"min_lr_ratio|\w*_fraction", lambda v: 0 <= v <= 1, "in [0, 1]"),
)
# 0 means "off" or "someone else's value" for these keys (also where a config nests them
# in a section of its own, as ch5_all does with mae.*).
_ZERO_MEANS_OFF = {"lm.monitor_batches", "judge.steps", "mae.pretrain_batch_size",
                   "mae.pretrain_warmup_steps"}


def check_ranges(cfg: ml_collections.ConfigDict) -> None:
    """Raises ConfigError naming the first numeric key out of its range (a batch size of
    -1, a learning rate of 0, log_every=0, ...), so a bad value stops before any file is
    written instead of as a traceback minutes into a run."""
    flat = _flatten(cfg)
    for key, value in flat.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"config key {key} must be a finite number, got {value}")
        if value == 0 and any(key == k or key.endswith("." + k) for k in _ZERO_MEANS_OFF):
            continue
        leaf = key.rsplit(".", 1)[-1]
        for pattern, ok, text in _RANGES:
            if re.fullmatch(pattern, leaf):
                if not ok(value):
                    raise ConfigError(f"config key {key} must be {text}, got {value}")
                break
    t = cfg.get("train")
    if t is not None and "grad_accum" in t and t.batch_size % t.grad_accum:
        raise ConfigError(f"config key train.batch_size={t.batch_size} is not divisible by "
                          f"train.grad_accum={t.grad_accum}")


def _flatten(node, prefix: str = "") -> dict:
    out = {}
    for key, value in node.items():
        name = f"{prefix}{key}"
        if isinstance(value, (ml_collections.ConfigDict, Mapping)):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def resolve(path_str: str) -> pathlib.Path:
    """A config file from a path, or from a short name (`ch4_gpt`, `configs/ch4_gpt.py`) of
    a file in CONFIG_DIR, so the README's commands also work outside a checkout."""
    path = pathlib.Path(path_str)
    if path.is_file():
        return path
    if not path.is_absolute() and str(path.parent) in (".", "configs"):
        shipped = CONFIG_DIR / (path.name if path.suffix == ".py" else f"{path.name}.py")
        if shipped.is_file():
            return shipped
    raise ConfigError(f"config file not found: {path_str} (a path, or a name such as "
                      f"ch2_digits from {CONFIG_DIR})")


def _parse_value(text: str, current):
    """Parses an override string into the type of the current value, or raises ValueError."""
    if isinstance(current, bool):
        low = text.lower()
        if low in ("true", "1", "yes"):
            return True
        if low in ("false", "0", "no"):
            return False
        raise ValueError("expected a bool")
    if isinstance(current, int):
        return int(text)
    if isinstance(current, float):
        return float(text)
    if isinstance(current, str):
        return text
    if isinstance(current, (tuple, list)):
        value = ast.literal_eval(text)
        if not isinstance(value, (tuple, list)):
            value = (value,)
        return type(current)(value)
    raise ValueError(f"cannot override a {type(current).__name__}")


def override(cfg: ml_collections.ConfigDict, key: str, text: str) -> None:
    """Sets `cfg.<key>` from a command-line string, keeping the existing type."""
    *parents, leaf = key.split(".")
    node = cfg
    for i, part in enumerate(parents):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            raise ConfigError(f"unknown config key: {'.'.join(parents[:i + 1])}")
        node = node[part]
    if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
        raise ConfigError(f"unknown config key: {key}")
    current = node[leaf]
    if isinstance(current, ml_collections.ConfigDict):
        raise ConfigError(f"config key {key} is a section; set one of its keys")
    try:
        value = _parse_value(text, current)
    except (ValueError, SyntaxError) as e:
        raise ConfigError(
            f"config key {key} expects {type(current).__name__}, got {text!r}") from e
    with node.unlocked():
        node[leaf] = value


def derive(cfg: ml_collections.ConfigDict, changes: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """A copy of `cfg` with `changes` applied, the one way to make a variant of a config.

    Keys are dotted paths as on the command line (`{"train.steps": 5, "model.window": 16}`);
    a value replaces the key's value, a dict or ConfigDict replaces (or adds) a whole section,
    None removes the key (`{"mesh": None}`: run unsharded). Unknown keys and wrong types
    raise ConfigError naming the key; `cfg` itself is not changed.
    """
    out = cfg.copy_and_resolve_references()
    for key, value in changes.items():
        *parents, leaf = key.split(".")
        node = out
        for i, part in enumerate(parents):
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                raise ConfigError(f"unknown config key: {'.'.join(parents[:i + 1])}")
            node = node[part]
        section = isinstance(value, (Mapping, ml_collections.ConfigDict))
        if leaf not in node and not (section or value is None):
            raise ConfigError(f"unknown config key: {key}")
        with node.unlocked():
            if value is None:
                if leaf in node:
                    del node[leaf]
                continue
            if section:  # a copy: the derived config shares nothing with its sources
                plain = value.to_dict() if hasattr(value, "to_dict") else dict(value)
                value = ml_collections.ConfigDict(plain)
            try:
                node[leaf] = value
            except TypeError as e:
                raise ConfigError(f"config key {key}: {e}") from None
    return out


def experiments(chapter: str) -> list[tuple[str, str]]:
    """(short name, first docstring line) of every config file of a chapter."""
    out = []
    for path in sorted(CONFIG_DIR.glob(f"{chapter}_*.py")):
        doc = ""
        text = path.read_text()
        tree = ast.parse(text)
        docstring = ast.get_docstring(tree)
        if docstring:
            doc = docstring.strip().splitlines()[0]
        out.append((path.stem, doc))
    return out
