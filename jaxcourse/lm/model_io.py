"""Saving a trained GPT with its config and tokenizer, and loading it back (orbax, no pickle)."""
from __future__ import annotations

import dataclasses
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from jaxcourse.data import tokenizers as toklib
from jaxcourse.errors import UserError
from jaxcourse.lm.params import abstract_params
from jaxcourse.models.transformer import GPTConfig
from jaxcourse.train import Checkpointer


def save_model(workdir: pathlib.Path, model_cfg: GPTConfig, params, tok) -> None:
    """workdir/model.json (GPTConfig), tokenizer.json and the parameters under model/."""
    workdir = pathlib.Path(workdir)
    (workdir / "model.json").write_text(json.dumps(dataclasses.asdict(model_cfg), indent=1))
    tok.save(workdir / "tokenizer.json")
    ckpt = Checkpointer(workdir / "model", keep=1)
    ckpt.save(0, {"params": params}, {})
    ckpt.wait()


def load_model(workdir: pathlib.Path):
    """(GPTConfig, params, tokenizer) saved by `save_model`."""
    workdir = pathlib.Path(workdir)
    if not (workdir / "model.json").is_file():
        raise UserError(f"no pretrained model in {workdir} (model.json missing); train one "
                        "first, e.g. python -m jaxcourse.ch4 --config=configs/ch4_gpt.py")
    model_cfg = GPTConfig(**json.loads((workdir / "model.json").read_text()))
    tok = toklib.load_tokenizer(workdir / "tokenizer.json")
    restored = Checkpointer(workdir / "model", keep=1).restore_latest(
        {"params": abstract_params(model_cfg)})
    if restored is None:
        raise UserError(f"no saved parameters under {workdir / 'model'}")
    # Uncommitted copies: the same jit cache entries as freshly trained parameters.
    params = jax.tree.map(lambda x: jnp.asarray(np.asarray(x)), restored[0]["params"])
    return model_cfg, params, tok
