"""Google's qwix (pip install -e ".[quant]") on the same GPT: weight-only int8 PTQ of every
Dense kernel in the blocks (qwix's `PtqProvider`; the embedding stays float as here), so the
from-scratch int8 of weights.py can be held to a library implementation. qwix also does
int4, W8A8 and QAT; only the int8 weight-only row is compared in chapter 4 so far."""
from __future__ import annotations

import dataclasses
import importlib

import jax
import jax.numpy as jnp

from jaxcourse.errors import UserError
from jaxcourse.models.transformer import GPT, GPTConfig, init_cache


def _qwix():
    try:
        return importlib.import_module("qwix")
    except ImportError as e:
        raise UserError('qwix is not installed: pip install -e ".[quant]"') from e


@dataclasses.dataclass(frozen=True)
class QwixGPT:
    """The GPT under qwix's int8 weight-only PTQ, with the decode interface of the GPT."""
    cfg: GPTConfig

    @property
    def module(self):
        qwix = _qwix()
        rules = [qwix.QtRule(module_path="blocks/.*", weight_qtype="int8")]
        return qwix.quantize_model(GPT(self.cfg), qwix.PtqProvider(rules))

    @property
    def max_length(self) -> int:
        return self.cfg.context

    def init_cache(self, batch_size: int, length: int = 0) -> dict:
        return init_cache(self.cfg, batch_size, length)

    def apply(self, variables, *args, **kwargs):
        return self.module.apply(variables, *args, **kwargs)


def qwix_int8(cfg: GPTConfig, params):
    """(QwixGPT, its quantized parameters) from float parameters."""
    model = QwixGPT(cfg)
    x = jnp.zeros((1, 1), jnp.int32)
    abstract = jax.eval_shape(model.module.init, jax.random.key(0), x)["params"]
    return model, _qwix().quantize_params(params, abstract)
