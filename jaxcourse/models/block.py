"""The transformer block (two slots: token mixer and feed-forward) and the layer stack.

    block:  x -> x + mixer(norm(x)) -> x + ffn(norm(x))        (pre-LN; post-LN: norm(x + f(x)))

The mixer and ffn are looked up by name in `models/registry.py`; `model.layer_pattern`
("attention,mamba,mamba") repeats a list of mixers to n_layer. With `scan_layers` the stack is
one `nn.scan` over repeats of the pattern (one compiled group of blocks, parameters stacked on
a leading "layers" axis).

The stack's decode state is a tuple with one entry per pattern position, each the mixer's own
cache stacked over the repeats: for plain attention ({"k", "v": [L, B, K, S, D]},). An ffn
with a decode state (`init_cache`, e.g. RWKV's channel-mix) adds its own beside the mixer's:
({"mixer": ..., "ffn": ...},). An entry may instead be a list of the repeats' caches (not
stacked; not with scan_layers), and comes back as one: a decode loop that carries it that
way updates each layer's cache in place, where slicing and restacking the stacked form
copies the whole cache every step (the serving engine's decode chunk, serve/steps.py).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxcourse.models import aux_losses, registry
from jaxcourse.models.attention import Attention
from jaxcourse.models.layers import Norm

BOUNDARY = ("batch", "length", "embed")  # Logical axes of activations between blocks.
_SCANNED = {"params": 0, "intermediates": 0, aux_losses.LOSSES: 0, aux_losses.METRICS: 0}


def _sublayer(cfg, kind: str, name: str, **context):
    cls = registry.lookup(kind, name)
    return cls.from_config(cfg, cfg.options_for(kind, name),
                           name=registry.slot_name(kind, name), **context)


class Block(nn.Module):
    """One layer: mixer, optional cross-attention (encoder-decoder), feed-forward.

    Called as (x [B,T,D], cache, side) -> (x, new cache) so nn.scan can carry x, scan the
    per-layer cache and broadcast `side`: {"positions" [T], "cache_index", "valid" [B,T],
    "context" [B,S,D], "context_valid" [B,S]}; `valid` marks real tokens (padding is never
    attended to).
    """
    cfg: Any  # GPTConfig
    mixer: str = "attention"
    causal: bool = True
    cross: bool = False
    deterministic: bool = True

    def _residual(self, x, sublayer, name):
        """Pre-LN: x + f(norm(x)). Post-LN: norm(x + f(x))."""
        c = self.cfg
        norm = Norm(c.norm, c.norm_impl, use_bias=c.bias, dtype=c.compute_dtype,
                    name=f"{name}_norm")
        drop = nn.Dropout(c.dropout, deterministic=self.deterministic)
        if c.norm_position == "pre":
            return x + drop(sublayer(norm(x)))
        return norm(x + drop(sublayer(x)))

    @nn.compact
    def __call__(self, x_BxTxD, cache, side):
        c = self.cfg
        x_BxTxD = nn.with_logical_constraint(x_BxTxD, BOUNDARY)
        mixer = _sublayer(c, "mixer", self.mixer, causal=self.causal,
                          deterministic=self.deterministic)
        stateful_ffn = ffn_has_cache(c)
        mixer_cache, ffn_cache = ((cache["mixer"], cache["ffn"]) if stateful_ffn and cache
                                  is not None else (cache, None))
        new_cache = []

        def mix(h):
            y, layer_cache = mixer(h, positions_T=side["positions"], kv_valid=side["valid"],
                                   cache=mixer_cache, cache_index=side["cache_index"])
            new_cache.append(layer_cache)
            return y

        x_BxTxD = self._residual(x_BxTxD, mix, mixer.name)
        if self.cross:
            cross = Attention.from_config(c, name="cross_attention", causal=False)
            x_BxTxD = self._residual(
                x_BxTxD, lambda h: cross(h, side["positions"], context_BxSxD=side["context"],
                                         kv_valid=side["context_valid"])[0],
                "cross_attention")
        if getattr(registry.lookup("ffn", c.ffn), "skip", False):  # model.ffn="none"
            return nn.with_logical_constraint(x_BxTxD, BOUNDARY), new_cache[0]
        ffn = _sublayer(c, "ffn", c.ffn, deterministic=self.deterministic)
        if not stateful_ffn:
            x_BxTxD = self._residual(x_BxTxD, ffn, ffn.name)
            return nn.with_logical_constraint(x_BxTxD, BOUNDARY), new_cache[0]

        def feed(h):  # an ffn with a decode state (RWKV's token-shifted channel-mix)
            y, state = ffn(h, cache=ffn_cache)
            new_cache.append(state)
            return y

        x_BxTxD = self._residual(x_BxTxD, feed, ffn.name)
        layer_cache = None if cache is None else {"mixer": new_cache[0], "ffn": new_cache[1]}
        return nn.with_logical_constraint(x_BxTxD, BOUNDARY), layer_cache


class _Group(nn.Module):
    """One repeat of a layer pattern of several mixers: the body nn.scan repeats."""
    cfg: Any
    pattern: tuple[str, ...]
    causal: bool = True
    cross: bool = False
    deterministic: bool = True

    @nn.compact
    def __call__(self, x_BxTxD, cache, side):
        new = []
        for j, kind in enumerate(self.pattern):
            x_BxTxD, layer_cache = _block_cls(self.cfg)(
                self.cfg, kind, self.causal, self.cross, self.deterministic,
                name=f"layer_{j}")(x_BxTxD, None if cache is None else cache[j], side)
            new.append(layer_cache)
        return x_BxTxD, None if cache is None else tuple(new)


def _remat_policy(name):
    if name == "full":
        return None  # jax.checkpoint's default: save nothing, recompute everything.
    return getattr(jax.checkpoint_policies, name)


def _block_cls(cfg):
    if not cfg.remat:
        return Block
    return nn.remat(Block, policy=_remat_policy(cfg.remat), prevent_cse=not cfg.scan_layers)


class Stack(nn.Module):
    """n_layer blocks, as a Python loop or an nn.scan over pattern repeats, optional remat."""
    cfg: Any
    causal: bool = True
    cross: bool = False
    deterministic: bool = True

    @nn.compact
    def __call__(self, x_BxTxD, positions_T, *, cache=None, cache_index=None, valid=None,
                 context=None, context_valid=None):
        c = self.cfg
        pattern = c.pattern
        side = {"positions": positions_T, "cache_index": cache_index, "valid": valid,
                "context": context, "context_valid": context_valid}
        kwargs = dict(cfg=c, causal=self.causal, cross=self.cross,
                      deterministic=self.deterministic)
        if c.scan_layers:
            return self._scanned(x_BxTxD, cache, side, kwargs)
        new = [[] for _ in pattern]
        for i in range(c.n_layer):
            j, r = i % len(pattern), i // len(pattern)
            layer_cache = None if cache is None else (
                cache[j][r] if isinstance(cache[j], list) else
                jax.tree.map(lambda a: a[r], cache[j]))
            x_BxTxD, layer_cache = _block_cls(c)(**kwargs, mixer=pattern[j],
                                                 name=f"layer_{i}")(x_BxTxD, layer_cache, side)
            new[j].append(layer_cache)
        if cache is None:
            return x_BxTxD, None
        return x_BxTxD, tuple(
            caches if isinstance(given, list) else
            jax.tree.map(lambda *a: jnp.stack(a), *caches) for caches, given in zip(new, cache))

    def _scanned(self, x_BxTxD, cache, side, kwargs):
        c, pattern = self.cfg, self.cfg.pattern
        scan = dict(variable_axes=_SCANNED, split_rngs={"params": True, "dropout": True},
                    length=c.n_layer // len(pattern), in_axes=(0, nn.broadcast),
                    metadata_params={nn.PARTITION_NAME: "layers"})
        if len(pattern) == 1:  # the plain stack: blocks scanned directly
            body = nn.scan(_block_cls(c), **scan)(**kwargs, mixer=pattern[0], name="layers")
            x_BxTxD, new = body(x_BxTxD, None if cache is None else cache[0], side)
            return x_BxTxD, None if cache is None else (new,)
        body = nn.scan(_Group, **scan)(pattern=pattern, **kwargs, name="layers")
        return body(x_BxTxD, cache, side)


def ffn_has_cache(cfg) -> bool:
    """Whether the ffn keeps a decode state of its own (a class with `init_cache`)."""
    return hasattr(registry.lookup("ffn", cfg.ffn), "init_cache")


def init_stack_cache(cfg, batch_size: int, length: int, dtype) -> tuple:
    """Each pattern position's mixer cache, stacked over the pattern's repeats; with an ffn
    that has a decode state, {"mixer": mixer cache, "ffn": ffn cache} per position."""
    repeats = cfg.n_layer // len(cfg.pattern)
    out = []
    for kind in cfg.pattern:
        one = registry.lookup("mixer", kind).init_cache(
            cfg, cfg.options_for("mixer", kind), batch_size, length, dtype)
        if ffn_has_cache(cfg):
            one = {"mixer": one, "ffn": registry.lookup("ffn", cfg.ffn).init_cache(
                cfg, cfg.options_for("ffn", cfg.ffn), batch_size, length, dtype)}
        out.append(jax.tree.map(lambda a: jnp.repeat(a[None], repeats, axis=0), one))
    return tuple(out)
