"""Transformers: the config and the decoder-only GPT (blocks: block.py; encoders:
encoder_decoder.py).

One frozen dataclass, `GPTConfig`, holds every hyper-parameter; `gpt_config(cfg.model)`
builds it from a config section (every chapter goes through it). Blocks are pre-LN (GPT-2,
Xiong et al. 2020) or post-LN (the original Transformer), with RMSNorm or LayerNorm, RoPE /
learned / sinusoidal positions; the token mixer (`mixer`, or a `layer_pattern` of mixers for
hybrids) and the feed-forward (`ffn`) come from the registries of models/registry.py.

    model = GPT(GPTConfig(vocab_size=65, context=128))
    params = nn.meta.unbox(model.init(rng, tokens_BxT)["params"])
    logits_BxTxV = model.apply({"params": params}, tokens_BxT)

Decoding lives in `jaxcourse.models.decode`; the model only knows how to make an empty
decode state (`model.init_cache(batch, length)`: each mixer's own cache) and how to extend
it (`model.apply(..., tokens, cache=cache)` -> (logits, new cache)).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from jaxcourse.errors import UserError
from jaxcourse.models import registry
from jaxcourse.models.attention import ATTENTION_IMPLS
from jaxcourse.models.block import Stack, init_stack_cache
from jaxcourse.models.layers import (INITS, NORM_IMPLS, NORMS, Embed, Norm, bf16_dot_general,
                                     native_bf16_matmul, partitioned, sinusoidal_table)

POSITIONS = ("rope", "learned", "sinusoidal", "none")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    """Hyper-parameters of every transformer in this file. 0 means "the usual default"."""
    vocab_size: int = 256
    context: int = 128             # Longest sequence (and KV cache) the model accepts.
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int = 0             # 0: = n_head (MHA); 1: MQA; in between: GQA.
    d_model: int = 128
    d_ff: int = 0                  # 0: 4 * d_model.
    mixer: str = "attention"       # The token mixer of every block (models/registry.py).
    layer_pattern: str = ""        # "attention,mamba,mamba": mixers repeated to n_layer
                                   # (hybrids); "" = `mixer` in every layer.
    ffn: str = "mlp"               # mlp (GELU) | swiglu | none (models/registry.py).
    dropout: float = 0.0
    norm: str = "rmsnorm"          # rmsnorm | layernorm
    norm_position: str = "pre"     # pre | post
    norm_impl: str = "flax"        # flax | pallas
    pos: str = "rope"              # rope | learned | sinusoidal | none
    rope_base: float = 10000.0
    init: str = "xavier"           # Attention and MLP kernels: xavier | normal (N(0, 0.02),
                                   # GPT-2's; layers.kernel_init). Other mixers keep theirs.
    attention: str = "xla"         # einsum | xla | cudnn | pallas
    window: int = 0                # Sliding-window size; 0: full causal attention.
    dtype: str = "float32"         # Compute dtype; parameters stay float32.
    matmul: str = ""               # "": in `dtype`; "bfloat16": Dense matmuls (forward and
                                   # backward) in bf16 with f32 accumulation (layers.py);
                                   # "auto": bfloat16 where the hardware multiplies bf16
                                   # natively (layers.native_bf16_matmul), else "".
    tie_embeddings: bool = True
    bias: bool = False             # Biases in attention / MLP projections.
    remat: str = ""                # "": off; "full"; or a jax.checkpoint_policies name.
    scan_layers: bool = False      # nn.scan over layers: one compiled block, stacked params.
    options: tuple = ()            # ((sublayer name, its Options), ...): `model.<name>.*`
                                   # sections of sublayers with options of their own.

    def __post_init__(self):
        registry.check("mixer", self.mixer, "model.mixer")
        registry.check("ffn", self.ffn, "model.ffn")
        for kind in self.pattern:
            registry.check("mixer", kind, "model.layer_pattern entry")
        if self.n_layer % len(self.pattern):
            raise UserError(f"model.n_layer={self.n_layer} is not a multiple of the "
                            f"{len(self.pattern)} entries of model.layer_pattern")
        object.__setattr__(self, "options", _normalize_options(self.options))
        _check_choice("norm", self.norm, NORMS)
        _check_choice("norm_position", self.norm_position, ("pre", "post"))
        _check_choice("norm_impl", self.norm_impl, NORM_IMPLS)
        _check_choice("pos", self.pos, POSITIONS)
        _check_choice("init", self.init, INITS)
        _check_choice("attention", self.attention, ATTENTION_IMPLS)
        _check_choice("dtype", self.dtype, tuple(DTYPES))
        _check_choice("matmul", self.matmul, ("", "bfloat16", "auto"))
        for name in ("vocab_size", "context", "n_layer", "n_head", "d_model"):
            if getattr(self, name) <= 0:
                raise UserError(f"model.{name} must be positive, got {getattr(self, name)}")
        if self.d_model % self.n_head:
            raise UserError(f"model.d_model={self.d_model} is not divisible by "
                            f"n_head={self.n_head}")
        if self.n_kv_head < 0 or self.n_head % self.kv_heads:
            raise UserError(f"model.n_head={self.n_head} is not a multiple of "
                            f"n_kv_head={self.n_kv_head}")
        if self.pos == "rope" and self.head_dim % 2:
            raise UserError(f"pos='rope' needs an even head dim, got {self.head_dim}")
        if not 0.0 <= self.dropout < 1.0 or self.window < 0 or self.d_ff < 0:
            raise UserError("model.dropout must be in [0, 1), window and d_ff >= 0")
        if self.remat not in ("", "full") and not hasattr(jax.checkpoint_policies, self.remat):
            raise UserError(f"model.remat={self.remat!r} is neither '', 'full' nor a "
                            "jax.checkpoint_policies name")

    @property
    def pattern(self) -> tuple[str, ...]:
        """The mixers of one repeat of the layer pattern."""
        if not self.layer_pattern.strip():
            return (self.mixer,)
        return tuple(k.strip() for k in self.layer_pattern.split(","))

    def require_attention(self, what: str) -> None:
        """A UserError unless every mixer is attention; `what` names the feature needing it."""
        if any(kind != "attention" for kind in self.pattern):
            raise UserError(f"{what} needs attention mixers; the model's are {self.pattern}")

    def options_for(self, kind: str, name: str):
        """The options of sublayer `name` (config values, else its defaults; None if it
        has no options)."""
        for key, value in self.options:
            if key == name:
                return value
        cls = registry.options_class(kind, name)
        return None if cls is None else cls()

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def ff_dim(self) -> int:
        return self.d_ff or 4 * self.d_model

    @property
    def compute_dtype(self):
        return DTYPES[self.dtype]

    @property
    def dot_general(self):
        if self.matmul == "auto":
            return bf16_dot_general if native_bf16_matmul() else None
        return bf16_dot_general if self.matmul == "bfloat16" else None


def _normalize_options(options) -> tuple:
    """((name, Options instance), ...) from a mapping or pairs of name and dict/instance (a
    config as read back from JSON)."""
    pairs = options.items() if isinstance(options, dict) else options
    out = []
    for name, value in pairs:
        cls = _options_class_of(name)
        if cls is None:
            raise UserError(f"model.{name} is not a sublayer with options")
        if not isinstance(value, cls):
            value = _build_options(cls, name, dict(value))
        out.append((name, value))
    return tuple(sorted(out, key=lambda kv: kv[0]))


def _options_class_of(name: str):
    for kind in ("mixer", "ffn"):
        if name in registry.names(kind):
            return registry.options_class(kind, name)
    return None


def _build_options(cls, name: str, values: dict):
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - fields
    if unknown:
        raise UserError(f"unknown model.{name} keys: {', '.join(sorted(unknown))}; "
                        f"known: {', '.join(sorted(fields))}")
    return cls(**values)


def _check_choice(name, value, choices):
    if value not in choices:
        raise UserError(f"model.{name}={value!r} is not one of {', '.join(choices)}")


def model_section(**overrides) -> ml_collections.ConfigDict:
    """A `cfg.model` config section holding every GPTConfig field (typed defaults)."""
    section = {f.name: getattr(GPTConfig(), f.name) for f in dataclasses.fields(GPTConfig)
               if f.name != "options"}
    for name in _sublayers_with_options():  # model.<name>.* sections with their defaults
        section[name] = dataclasses.asdict(_options_class_of(name)())
    unknown = set(overrides) - set(section)
    if unknown:
        raise UserError(f"unknown model keys: {', '.join(sorted(unknown))}")
    section.update(overrides)
    return ml_collections.ConfigDict(section)


def gpt_config(section: Any, **overrides) -> GPTConfig:
    """Builds a GPTConfig from a config section (ConfigDict or dict), naming unknown keys."""
    values = dict(section.to_dict() if hasattr(section, "to_dict") else section)
    values.update(overrides)
    options = dict(values.pop("options", ()))
    for name in list(values):
        if isinstance(values[name], dict) and _options_class_of(name) is not None:
            options[name] = values.pop(name)
    fields = {f.name for f in dataclasses.fields(GPTConfig)} - {"options"}
    unknown = set(values) - fields
    if unknown:
        raise UserError(f"unknown model config keys: {', '.join(sorted(unknown))}")
    return GPTConfig(**values, options=tuple(options.items()))


def _sublayers_with_options() -> list[str]:
    return [name for kind in ("mixer", "ffn") for name in registry.names(kind)
            if registry.options_class(kind, name) is not None]


def check_length(cfg: GPTConfig, t: int, what: str):
    if t > cfg.context:
        raise UserError(f"{what} has length {t}, longer than the model context {cfg.context}")


class Positions(nn.Module):
    """Additive position encodings: a learned table or the fixed sinusoids (RoPE and "none"
    add nothing here: RoPE rotates queries and keys inside attention)."""
    cfg: GPTConfig

    @nn.compact
    def __call__(self, x_BxTxD, positions):
        """positions: [T], or [B, T] (each row at its own offset)."""
        c = self.cfg
        if c.pos == "learned":
            init = partitioned(nn.initializers.normal(stddev=0.02), (None, "embed"))
            table = self.param("table", init, (c.context, c.d_model))
            enc = jnp.take(table, positions, axis=0)
        elif c.pos == "sinusoidal":
            enc = sinusoidal_table(positions, c.d_model)
        else:
            return x_BxTxD
        return x_BxTxD + (enc if enc.ndim == 3 else enc[None]).astype(x_BxTxD.dtype)


class GPT(nn.Module):
    """Decoder-only language model (Radford et al. 2018/2019): tokens [B,T] -> logits [B,T,V].

    `prefix_BxPxD` (optional) are embeddings placed before the tokens, e.g. projected image
    patches of a vision-language model; the logits then cover all P + T positions.
    With `cache` (from `init_cache`: {"layers": each mixer's state, "index": int32}) the
    inputs are appended at cache["index"] and (logits, new cache) is returned: this one
    method serves prefill (T = prompt length) and one-token decode steps alike. An index
    of shape [B] puts every row at its own fill level (attention mixers only: the serving
    engine's decode slots, serve/steps.py).
    """
    cfg: GPTConfig

    @nn.compact
    def __call__(self, tokens_BxT, *, train: bool = False, cache=None, prefix_BxPxD=None):
        c = self.cfg
        embed = Embed(c.vocab_size, c.d_model, c.compute_dtype, name="embed")
        x_BxTxD = embed(tokens_BxT)
        if prefix_BxPxD is not None:
            x_BxTxD = jnp.concatenate([prefix_BxPxD.astype(x_BxTxD.dtype), x_BxTxD], axis=1)
        t = x_BxTxD.shape[1]
        check_length(c, t, "the input")
        index = jnp.zeros((), jnp.int32) if cache is None else cache["index"]
        positions = index[..., None] + jnp.arange(t)                   # [T] | [B, T]
        x_BxTxD = Positions(c, name="positions")(x_BxTxD, positions)
        x_BxTxD = nn.Dropout(c.dropout, deterministic=not train)(x_BxTxD)
        x_BxTxD, layers = Stack(c, deterministic=not train, name="blocks")(
            x_BxTxD, positions, cache=None if cache is None else cache["layers"],
            cache_index=index)
        logits_BxTxV = output_head(c, embed, x_BxTxD, "lm_head")
        if cache is None:
            return logits_BxTxV
        return logits_BxTxV, {"layers": layers, "index": index + t}

    @nn.nowrap
    def init_cache(self, batch_size: int, length: int = 0, dtype=None) -> dict:
        return init_cache(self.cfg, batch_size, length, dtype)

    @property
    def max_length(self) -> int:
        """Longest sequence (prompt + new tokens) the model decodes."""
        return self.cfg.context


def final_norm(c: GPTConfig, x_BxTxD):
    if c.norm_position == "post":
        return x_BxTxD
    return Norm(c.norm, c.norm_impl, use_bias=c.bias, dtype=c.compute_dtype,
                name="final_norm")(x_BxTxD)


def output_head(c: GPTConfig, embed: Embed, x_BxTxD, name):
    """Final norm (pre-LN only: post-LN blocks end normalized) and the vocab projection."""
    x_BxTxD = final_norm(c, x_BxTxD)
    if c.tie_embeddings:
        logits = embed.attend(x_BxTxD)
    else:
        logits = nn.Dense(c.vocab_size, use_bias=False, dtype=c.compute_dtype, name=name,
                          dot_general=c.dot_general,
                          kernel_init=partitioned(nn.initializers.normal(stddev=0.02),
                                                  ("embed", "vocab")))(x_BxTxD)
    return nn.with_logical_constraint(logits.astype(jnp.float32), ("batch", "length", "vocab"))


def init_cache(cfg: GPTConfig, batch_size: int, length: int = 0, dtype=None) -> dict:
    """An empty decode state for `length` positions (default: the whole context): every
    mixer's own cache (attention: K/V of `length` positions; recurrent mixers: a fixed-size
    state) and the fill level."""
    length = length or cfg.context
    check_length(cfg, length, "the KV cache")
    layers = init_stack_cache(cfg, batch_size, length, dtype or cfg.compute_dtype)
    return {"layers": layers, "index": jnp.zeros((), jnp.int32)}


def attention_maps(cfg: GPTConfig, params, tokens_BxT):
    """Attention probabilities of every layer, [L, B, H, T, T], via the einsum reference."""
    return _attention_maps(dataclasses.replace(cfg, attention="einsum"), params, tokens_BxT)


@functools.partial(jax.jit, static_argnums=0)
def _attention_maps(cfg: GPTConfig, params, tokens_BxT):
    _, state = GPT(cfg).apply({"params": params}, tokens_BxT, mutable=["intermediates"])
    blocks = state["intermediates"]["blocks"]
    if cfg.scan_layers:
        return blocks["layers"]["attention"]["attention_probs"][0]
    return jnp.stack([blocks[f"layer_{i}"]["attention"]["attention_probs"][0]
                      for i in range(cfg.n_layer)])
