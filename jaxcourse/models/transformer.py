"""Transformers: the config, blocks and the decoder-only GPT (encoders: encoder_decoder.py).

One frozen dataclass, `GPTConfig`, holds every hyper-parameter; `gpt_config(cfg.model)`
builds it from a config section (chapters 3, 4, 6 and 9 all go through it). Blocks are
pre-LN (GPT-2, Xiong et al. 2020) or post-LN (the original Transformer), with RMSNorm or
LayerNorm, RoPE / learned / sinusoidal positions, MHA / GQA / MQA and a sliding window.

    model = GPT(GPTConfig(vocab_size=65, context=128))
    params = nn.meta.unbox(model.init(rng, tokens_BxT)["params"])
    logits_BxTxV = model.apply({"params": params}, tokens_BxT)

Decoding with a KV cache lives in `jaxcourse.models.decode`; the model itself only knows
how to extend a cache (`model.apply(..., tokens, cache=cache)` -> (logits, new cache)).
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
from jaxcourse.models.attention import ATTENTION_IMPLS, Attention
from jaxcourse.models.layers import (MLP, NORM_IMPLS, NORMS, Embed, Norm, bf16_dot_general,
                                     partitioned, sinusoidal_table)

POSITIONS = ("rope", "learned", "sinusoidal", "none")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
BOUNDARY = ("batch", "length", "embed")  # Logical axes of activations between blocks.


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
    mlp: str = "gelu"              # gelu | swiglu
    dropout: float = 0.0
    norm: str = "rmsnorm"          # rmsnorm | layernorm
    norm_position: str = "pre"     # pre | post
    norm_impl: str = "flax"        # flax | pallas
    pos: str = "rope"              # rope | learned | sinusoidal | none
    rope_base: float = 10000.0
    attention: str = "xla"         # einsum | xla | cudnn | pallas
    window: int = 0                # Sliding-window size; 0: full causal attention.
    dtype: str = "float32"         # Compute dtype; parameters stay float32.
    matmul: str = ""               # "": in `dtype`; "bfloat16": Dense matmuls (forward and
                                   # backward) in bf16 with f32 accumulation (layers.py).
    tie_embeddings: bool = True
    bias: bool = False             # Biases in attention / MLP projections.
    remat: str = ""                # "": off; "full"; or a jax.checkpoint_policies name.
    scan_layers: bool = False      # nn.scan over layers: one compiled block, stacked params.

    def __post_init__(self):
        _check_choice("norm", self.norm, NORMS)
        _check_choice("norm_position", self.norm_position, ("pre", "post"))
        _check_choice("norm_impl", self.norm_impl, NORM_IMPLS)
        _check_choice("pos", self.pos, POSITIONS)
        _check_choice("attention", self.attention, ATTENTION_IMPLS)
        _check_choice("mlp", self.mlp, ("gelu", "swiglu"))
        _check_choice("dtype", self.dtype, tuple(DTYPES))
        _check_choice("matmul", self.matmul, ("", "bfloat16"))
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
        return bf16_dot_general if self.matmul == "bfloat16" else None


def _check_choice(name, value, choices):
    if value not in choices:
        raise UserError(f"model.{name}={value!r} is not one of {', '.join(choices)}")


def model_section(**overrides) -> ml_collections.ConfigDict:
    """A `cfg.model` config section holding every GPTConfig field (typed defaults)."""
    section = dataclasses.asdict(GPTConfig())
    unknown = set(overrides) - set(section)
    if unknown:
        raise UserError(f"unknown model keys: {', '.join(sorted(unknown))}")
    section.update(overrides)
    return ml_collections.ConfigDict(section)


def gpt_config(section: Any, **overrides) -> GPTConfig:
    """Builds a GPTConfig from a config section (ConfigDict or dict), naming unknown keys."""
    values = dict(section.to_dict() if hasattr(section, "to_dict") else section)
    values.update(overrides)
    fields = {f.name for f in dataclasses.fields(GPTConfig)}
    unknown = set(values) - fields
    if unknown:
        raise UserError(f"unknown model config keys: {', '.join(sorted(unknown))}")
    return GPTConfig(**values)


# ---------------------------------------------------------------------------------------
# Blocks.

class Block(nn.Module):
    """One transformer layer: self-attention, optional cross-attention, MLP.

    Called as (x, cache, positions, cache_index, valid, context, context_valid) -> (x, new
    cache) so nn.scan can carry x and scan the per-layer cache. `valid` [B,T] and
    `context_valid` [B,S] mark real tokens (padding is never attended to).
    """
    cfg: GPTConfig
    causal: bool = True
    cross: bool = False
    deterministic: bool = True

    def _norm(self, name):
        c = self.cfg
        return Norm(c.norm, c.norm_impl, use_bias=c.bias, dtype=c.compute_dtype, name=name)

    def _attention(self, name, causal):
        c = self.cfg
        return Attention(c.n_head, c.kv_heads, c.head_dim, c.d_model, impl=c.attention,
                         causal=causal, window=c.window, rope=c.pos == "rope",
                         rope_base=c.rope_base, use_bias=c.bias, dtype=c.compute_dtype,
                         dot_general=c.dot_general, name=name)

    def _residual(self, x, sublayer, name):
        """Pre-LN: x + f(norm(x)). Post-LN: norm(x + f(x))."""
        drop = nn.Dropout(self.cfg.dropout, deterministic=self.deterministic)
        if self.cfg.norm_position == "pre":
            out, aux = sublayer(self._norm(f"{name}_norm")(x))
            return x + drop(out), aux
        out, aux = sublayer(x)
        return self._norm(f"{name}_norm")(x + drop(out)), aux

    @nn.compact
    def __call__(self, x_BxTxD, cache, positions_T, cache_index, valid, context,
                 context_valid):
        c = self.cfg
        x_BxTxD = nn.with_logical_constraint(x_BxTxD, BOUNDARY)
        attn = self._attention("attention", self.causal)
        x_BxTxD, new_cache = self._residual(
            x_BxTxD, lambda h: attn(h, positions_T, kv_valid=valid, cache=cache,
                                         cache_index=cache_index),
            "attention")
        if self.cross:
            cross = self._attention("cross_attention", False)
            x_BxTxD, _ = self._residual(
                x_BxTxD, lambda h: cross(h, positions_T, context_BxSxD=context,
                                         kv_valid=context_valid), "cross_attention")
        mlp = MLP(c.d_model, c.ff_dim, c.mlp, c.bias, c.compute_dtype, c.dot_general, name="mlp")
        x_BxTxD, _ = self._residual(x_BxTxD, lambda h: (mlp(h), None), "mlp")
        return nn.with_logical_constraint(x_BxTxD, BOUNDARY), new_cache


def _remat_policy(name):
    if name == "full":
        return None  # jax.checkpoint's default: save nothing, recompute everything.
    return getattr(jax.checkpoint_policies, name)


class Stack(nn.Module):
    """n_layer blocks, as a Python loop or an nn.scan, with optional remat per block.

    The KV cache of the stack is {"k", "v"} with a leading layer axis [L, B, S, K, D].
    """
    cfg: GPTConfig
    causal: bool = True
    cross: bool = False
    deterministic: bool = True

    @nn.compact
    def __call__(self, x_BxTxD, positions_T, *, cache=None, cache_index=None, valid=None,
                 context=None, context_valid=None):
        c = self.cfg
        block_cls = Block
        if c.remat:
            block_cls = nn.remat(Block, policy=_remat_policy(c.remat),
                                 prevent_cse=not c.scan_layers)
        kwargs = dict(cfg=c, causal=self.causal, cross=self.cross,
                      deterministic=self.deterministic)
        if c.scan_layers:
            scanned = nn.scan(
                block_cls, variable_axes={"params": 0, "intermediates": 0},
                split_rngs={"params": True, "dropout": True}, length=c.n_layer,
                in_axes=(0,) + (nn.broadcast,) * 5,
                metadata_params={nn.PARTITION_NAME: "layers"})
            return scanned(**kwargs, name="layers")(
                x_BxTxD, cache, positions_T, cache_index, valid, context, context_valid)
        new_caches = []
        for i in range(c.n_layer):
            layer_cache = None if cache is None else jax.tree.map(lambda a: a[i], cache)
            x_BxTxD, layer_cache = block_cls(**kwargs, name=f"layer_{i}")(
                x_BxTxD, layer_cache, positions_T, cache_index, valid, context, context_valid)
            new_caches.append(layer_cache)
        if cache is None:
            return x_BxTxD, None
        return x_BxTxD, jax.tree.map(lambda *a: jnp.stack(a), *new_caches)


def _check_length(cfg: GPTConfig, t: int, what: str):
    if t > cfg.context:
        raise UserError(f"{what} has length {t}, longer than the model context {cfg.context}")


class _Positions(nn.Module):
    """Additive position encodings: a learned table or the fixed sinusoids."""
    cfg: GPTConfig

    @nn.compact
    def __call__(self, x_BxTxD, positions_T):
        c = self.cfg
        if c.pos == "learned":
            init = partitioned(nn.initializers.normal(stddev=0.02), (None, "embed"))
            table = self.param("table", init, (c.context, c.d_model))
            return x_BxTxD + jnp.take(table, positions_T, axis=0)[None].astype(x_BxTxD.dtype)
        if c.pos == "sinusoidal":
            return x_BxTxD + sinusoidal_table(positions_T, c.d_model)[None].astype(x_BxTxD.dtype)
        return x_BxTxD


class GPT(nn.Module):
    """Decoder-only language model (Radford et al. 2018/2019): tokens [B,T] -> logits [B,T,V].

    With `cache` ({"k", "v": [L,B,S,K,D], "index": int32}) the tokens are appended at
    cache["index"] and (logits, new cache) is returned: this one method serves prefill
    (T = prompt length) and one-token decode steps alike.
    """
    cfg: GPTConfig

    @nn.compact
    def __call__(self, tokens_BxT, *, train: bool = False, cache=None):
        c = self.cfg
        _check_length(c, tokens_BxT.shape[1], "the input")
        index = jnp.zeros((), jnp.int32) if cache is None else cache["index"]
        positions_T = index + jnp.arange(tokens_BxT.shape[1])
        embed = Embed(c.vocab_size, c.d_model, c.compute_dtype, name="embed")
        x_BxTxD = _Positions(c, name="positions")(embed(tokens_BxT), positions_T)
        x_BxTxD = nn.Dropout(c.dropout, deterministic=not train)(x_BxTxD)
        layer_cache = None if cache is None else {"k": cache["k"], "v": cache["v"]}
        x_BxTxD, layer_cache = Stack(c, deterministic=not train, name="blocks")(
            x_BxTxD, positions_T, cache=layer_cache, cache_index=index)
        logits_BxTxV = _head(c, embed, x_BxTxD, "lm_head")
        if cache is None:
            return logits_BxTxV
        return logits_BxTxV, {**layer_cache, "index": index + tokens_BxT.shape[1]}


def _final_norm(c: GPTConfig, x_BxTxD):
    if c.norm_position == "post":
        return x_BxTxD
    return Norm(c.norm, c.norm_impl, use_bias=c.bias, dtype=c.compute_dtype,
                name="final_norm")(x_BxTxD)


def _head(c: GPTConfig, embed: Embed, x_BxTxD, name):
    """Final norm (pre-LN only: post-LN blocks end normalized) and the vocab projection."""
    x_BxTxD = _final_norm(c, x_BxTxD)
    if c.tie_embeddings:
        logits = embed.attend(x_BxTxD)
    else:
        logits = nn.Dense(c.vocab_size, use_bias=False, dtype=c.compute_dtype, name=name,
                          dot_general=c.dot_general,
                          kernel_init=partitioned(nn.initializers.normal(stddev=0.02),
                                                  ("embed", "vocab")))(x_BxTxD)
    return nn.with_logical_constraint(logits.astype(jnp.float32), ("batch", "length", "vocab"))


def init_cache(cfg: GPTConfig, batch_size: int, length: int = 0, dtype=None) -> dict:
    """An empty KV cache for `length` positions (default: the whole context)."""
    length = length or cfg.context
    _check_length(cfg, length, "the KV cache")
    shape = (cfg.n_layer, batch_size, length, cfg.kv_heads, cfg.head_dim)
    dtype = dtype or cfg.compute_dtype
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
            "index": jnp.zeros((), jnp.int32)}


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
