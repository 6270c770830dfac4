"""The block's two slots: registries of token mixers and feed-forward sublayers.

A transformer block is norm -> mixer -> residual -> norm -> ffn -> residual. `model.mixer`
(or each entry of `model.layer_pattern`) names an entry of MIXERS, `model.ffn` one of FFNS.
Entries are "module:Class" strings, imported on first use, so this table is the one place a
new sublayer is listed and importing it costs nothing. Adding one = one file + one line here
(or `register("mixer", "name", Class)` from your own code, for a research fork).

The contract (see README, "Extending the model"):

    class MyMixer(nn.Module):
        Options = MyMixerOptions       # optional frozen dataclass: `model.my_mixer.*` keys
        slot_name = "my_mixer"         # optional: the parameter scope (default: the name)

        @classmethod
        def from_config(cls, cfg, options, *, name, causal, deterministic): ...
        def __call__(self, x_BxTxD, *, positions_T, kv_valid, cache, cache_index):
            return y_BxTxD, new_cache       # mixers: new_cache is None without a cache
        @classmethod
        def init_cache(cls, cfg, options, batch_size, length, dtype): ...  # mixers only

    feed-forward: from_config(cls, cfg, options, *, name, deterministic) and
    __call__(self, x_BxTxD) -> y_BxTxD; an ffn with a decode state of its own (RWKV's
    token-shifted channel-mix) also defines init_cache and is called as
    __call__(self, x_BxTxD, *, cache) -> (y_BxTxD, new_cache).

Any sublayer may emit auxiliary losses and metrics with `aux.sow_loss` / `aux.sow_metric`.
"""
from __future__ import annotations

import importlib

from jaxcourse.errors import UserError

MIXERS: dict[str, str | type] = {
    "attention": "jaxcourse.models.attention:Attention",
    "s4d": "jaxcourse.models.ssm:S4D",
    "mamba": "jaxcourse.models.ssm:Mamba",
    "mamba2": "jaxcourse.models.ssm:Mamba2",
    "rwkv": "jaxcourse.models.rwkv:RWKV6TimeMix",
    "retnet": "jaxcourse.models.retnet:MultiScaleRetention",
    "mla": "jaxcourse.models.mla:MultiHeadLatentAttention",
}
FFNS: dict[str, str | type] = {
    "mlp": "jaxcourse.models.layers:MLP",
    "swiglu": "jaxcourse.models.layers:SwiGLU",
    "moe": "jaxcourse.models.moe:MoE",
    "rwkv_cmix": "jaxcourse.models.rwkv:RWKVChannelMix",
    "none": "jaxcourse.models.layers:NoFFN",       # mixer-only blocks (the Mamba LM's)
}
_TABLES = {"mixer": MIXERS, "ffn": FFNS}


def register(kind: str, name: str, target: str | type) -> None:
    """Adds (or replaces) a sublayer: kind is "mixer" or "ffn"; target a class or
    "module:Class"."""
    _table(kind)[name] = target


def names(kind: str) -> tuple[str, ...]:
    return tuple(_table(kind))


def check(kind: str, name: str, key: str) -> None:
    """A one-line error naming the config key and the allowed values."""
    if name not in _table(kind):
        raise UserError(f"{key}={name!r} is not one of {', '.join(_table(kind))}")


def lookup(kind: str, name: str) -> type:
    """The class registered as `name`, imported on first use."""
    check(kind, name, f"model.{kind}")
    table = _table(kind)
    target = table[name]
    if isinstance(target, str):
        module, _, attr = target.partition(":")
        target = getattr(importlib.import_module(module), attr)
        table[name] = target
    return target


def options_class(kind: str, name: str):
    """The sublayer's options dataclass, or None when it has no options of its own."""
    return getattr(lookup(kind, name), "Options", None)


def slot_name(kind: str, name: str) -> str:
    """The parameter scope of the sublayer in a block (e.g. "attention", "mlp")."""
    return getattr(lookup(kind, name), "slot_name", name)


def _table(kind: str) -> dict:
    if kind not in _TABLES:
        raise ValueError(f"kind must be one of {tuple(_TABLES)}, got {kind!r}")
    return _TABLES[kind]
