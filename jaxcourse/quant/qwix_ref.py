"""Google's qwix (in the test extra; pip install -e ".[quant]") on the same GPT, so the
from-scratch schemes of weights.py / model.py can be held to a library implementation:

    int8       weight-only int8 per output channel   (PtqProvider, weight_qtype="int8")
    w8a8       int8 weights, int8 activations per token at run time (act_qtype="int8")
    int4-g{G}  int4 weights in groups of G input rows (weight_qtype="int4", tile_size=G)
    QAT        the same rules under QtProvider: fake-quantized training through the loop

Every Dense kernel in the blocks is quantized (the embedding stays float, as in weights.py).
qwix tiles only the innermost contraction axis, which for the attention output projection
[heads, head_dim, D] is head_dim: int4 groups larger than head_dim are ours alone."""
from __future__ import annotations

import dataclasses
import importlib

import jax
import jax.numpy as jnp

from jaxcourse.errors import UserError
from jaxcourse.models.transformer import GPT, GPTConfig, init_cache
from jaxcourse.quant import weights


def _qwix():
    try:
        return importlib.import_module("qwix")
    except ImportError as e:
        raise UserError('qwix is not installed: pip install -e ".[quant]"') from e


def supports(cfg: GPTConfig, scheme: str) -> bool:
    """Whether qwix quantizes `scheme` on this GPT (not float32; int4 groups <= head_dim)."""
    weights.check_scheme(scheme)
    if scheme.startswith("int4"):
        return (cfg.d_model // cfg.n_head) % weights._group_of(scheme) == 0
    return scheme != "float32"


def rules(cfg: GPTConfig, scheme: str) -> list:
    """qwix's rules for one of our scheme names; a scheme qwix cannot do is one line."""
    if not supports(cfg, scheme):
        raise UserError(f"qwix cannot quantize {scheme} on this GPT: float32 has nothing to "
                        f"quantize, and int4 tiles only the innermost contraction axis "
                        f"(head_dim {cfg.d_model // cfg.n_head} for the attention output)")
    kwargs = {"weight_qtype": "int8"}
    if scheme == "w8a8":
        kwargs["act_qtype"] = "int8"
    elif scheme.startswith("int4"):
        kwargs = {"weight_qtype": "int4", "tile_size": weights._group_of(scheme)}
    return [_qwix().QtRule(module_path="blocks/.*", **kwargs)]


@dataclasses.dataclass(frozen=True)
class QwixGPT:
    """The GPT under qwix's PTQ of `scheme`, with the decode interface of the GPT."""
    cfg: GPTConfig
    scheme: str = "int8"

    @property
    def module(self):
        qwix = _qwix()
        return qwix.quantize_model(GPT(self.cfg), qwix.PtqProvider(rules(self.cfg, self.scheme)))

    @property
    def max_length(self) -> int:
        return self.cfg.context

    def init_cache(self, batch_size: int, length: int = 0) -> dict:
        return init_cache(self.cfg, batch_size, length)

    def apply(self, variables, *args, **kwargs):
        return self.module.apply(variables, *args, **kwargs)


def qwix_ptq(cfg: GPTConfig, params, scheme: str = "int8"):
    """(QwixGPT, its quantized parameters) from float parameters."""
    model = QwixGPT(cfg, scheme)
    x = jnp.zeros((1, 1), jnp.int32)
    abstract = jax.eval_shape(model.module.init, jax.random.key(0), x)["params"]
    return model, _qwix().quantize_params(params, abstract)


def qat_module(cfg: GPTConfig, scheme: str):
    """The GPT under qwix's quantized training (QtProvider): the forward fake-quantizes as
    `scheme`, the backward passes the rounding straight through; parameters stay float."""
    qwix = _qwix()
    return qwix.quantize_model(GPT(cfg), qwix.QtProvider(rules(cfg, scheme)))
