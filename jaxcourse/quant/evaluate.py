"""The quantization table: val loss, model bytes, KV bytes per token and decode tokens/s of
one trained GPT under each scheme (chapter 4's compress experiment)."""
from __future__ import annotations

import functools

import jax
import numpy as np

from jaxcourse.lm.params import cache_bytes_per_token
from jaxcourse.lm.task import lm_loss
from jaxcourse.models import decode
from jaxcourse.quant import weights
from jaxcourse.quant.model import QuantizedGPT


@functools.partial(jax.jit, static_argnums=0)
def _batch_loss(model: QuantizedGPT, qparams, batch):
    return lm_loss(model.apply({"params": qparams}, batch["inputs"]), batch["targets"])[0]


def quantized_loss(model: QuantizedGPT, qparams, batches) -> float:
    """Mean next-token loss of the quantized model over fixed batches (as lm.mean_loss)."""
    return float(np.mean([_batch_loss(model, qparams, b) for b in batches]))


def qwix_row(model_cfg, params, scheme: str, val, decode_cfg) -> dict:
    """The row of `scheme` under Google's qwix PTQ (quant/qwix_ref.py)."""
    from jaxcourse.quant import qwix_ref  # noqa: PLC0415 (qwix is an optional dependency)
    model, qparams = qwix_ref.qwix_ptq(model_cfg, params, scheme)
    return _row(f"qwix {scheme}", model, qparams, model_cfg, "float32", val, decode_cfg)


def scheme_row(model_cfg, params, scheme: str, kv_int8: bool, val, decode_cfg) -> dict:
    """One row: scheme, val_loss, model_bytes, kv_bytes_per_token, decode_tokens_per_s."""
    model = QuantizedGPT(model_cfg, scheme, kv_int8=kv_int8)
    qparams = jax.jit(weights.quantize_params, static_argnums=1)(params, scheme)
    return _row(scheme + (" + kv int8" if kv_int8 else ""), model, qparams, model_cfg,
                "int8" if kv_int8 else "float32", val, decode_cfg)


def _row(name, model, qparams, model_cfg, kv_dtype, val, decode_cfg) -> dict:
    seconds, _ = decode.time_generate(model, qparams, decode_cfg.batch_size,
                                      decode_cfg.prompt_len, decode_cfg.new_tokens,
                                      use_cache=True, repeats=decode_cfg.repeats)
    return {"scheme": name,
            "val_loss": quantized_loss(model, qparams, val),
            "model_bytes": weights.param_bytes(qparams),
            "kv_bytes_per_token": cache_bytes_per_token(model_cfg, kv_dtype),
            "decode_tokens_per_s": decode_cfg.batch_size * decode_cfg.new_tokens / seconds}
