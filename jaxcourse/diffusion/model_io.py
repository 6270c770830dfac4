"""Saving a trained denoiser for later sampling, and refusing one that does not fit.

A model directory holds the parameters (orbax, through the shared `Checkpointer`) and
`model.json` with the U-Net and diffusion settings it was trained with. Loading compares
those settings with the current config first, so a mismatch is one line naming the key
rather than a shape error deep inside orbax or flax.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil

import jax
import jax.numpy as jnp

from jaxcourse.errors import UserError
from jaxcourse.models.unet import UNet, UNetConfig
from jaxcourse.train import Checkpointer

SAMPLING_KEYS = ("steps", "schedule", "prediction")  # diffusion settings sampling depends on.


def _record(ucfg: UNetConfig, diffusion_cfg) -> dict:
    return {"unet": {k: list(v) if isinstance(v, tuple) else v
                     for k, v in dataclasses.asdict(ucfg).items()},
            "diffusion": {k: diffusion_cfg[k] for k in SAMPLING_KEYS}}


def save_model(directory: pathlib.Path, params, ucfg: UNetConfig, diffusion_cfg,
               data_name: str) -> None:
    directory = pathlib.Path(directory)
    if directory.exists():
        shutil.rmtree(directory)  # our own previous export of this run.
    record = {**_record(ucfg, diffusion_cfg), "data": data_name}
    ckpt = Checkpointer(directory / "params", keep=1)
    ckpt.save(0, {"params": params}, record)
    ckpt.wait()
    (directory / "model.json").write_text(json.dumps(record, indent=2) + "\n")


def check_record(saved: dict, want: dict, where) -> None:
    """Raises UserError naming the first setting where a saved model and the config differ."""
    for section in ("unet", "diffusion"):
        for key in sorted(set(saved.get(section, {})) | set(want[section])):
            a, b = saved.get(section, {}).get(key, "absent"), want[section].get(key, "absent")
            if a != b:
                name = "model" if section == "unet" else "diffusion"
                raise UserError(f"model {where} was trained with {name}.{key}={a} but this config "
                                f"has {name}.{key}={b}; sample with the config it was trained with")


def load_model(directory: pathlib.Path, ucfg: UNetConfig, diffusion_cfg):
    """Parameters of the model saved in `directory`, after checking it matches the config."""
    directory = pathlib.Path(directory)
    record_path = directory / "model.json"
    if not record_path.is_file():
        raise UserError(f"no saved model at {directory} (expected {record_path}); point "
                        "sample.checkpoint at the 'model' folder of a ch8 run")
    try:
        saved = json.loads(record_path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"corrupt {record_path}: {e.msg}") from e
    check_record(saved, _record(ucfg, diffusion_cfg), directory)
    model = UNet(ucfg)
    x = jnp.zeros((1, ucfg.image_size, ucfg.image_size, ucfg.channels))
    t = jnp.zeros((1,), jnp.int32)
    label = jnp.zeros((1,), jnp.int32) if ucfg.num_classes else None
    abstract = jax.eval_shape(lambda: {"params": model.init(jax.random.PRNGKey(0), x, t,
                                                            label)["params"]})
    restored = Checkpointer(directory / "params", keep=1).restore_latest(abstract)
    if restored is None:
        raise UserError(f"no parameters saved under {directory / 'params'}")
    return restored[0]["params"]
