"""The encoder-vs-decoder lesson: a bidirectional encoder and an encoder-decoder, built from
the same `GPTConfig`, blocks, positions and head as the decoder-only GPT (transformer.py)."""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from jaxcourse.models.layers import Embed
from jaxcourse.models.transformer import (GPTConfig, Stack, _check_length, _final_norm, _head,
                                          _Positions)


class Encoder(nn.Module):
    """Bidirectional encoder (BERT-style): tokens [B,S] -> hidden [B,S,D] (or MLM logits).

    `valid` [B,S] marks real tokens; padding keys are never attended to.
    """
    cfg: GPTConfig
    lm_head: bool = False

    @nn.compact
    def __call__(self, tokens_BxS, valid_BxS=None, *, train: bool = False):
        c = self.cfg
        _check_length(c, tokens_BxS.shape[1], "the encoder input")
        positions_S = jnp.arange(tokens_BxS.shape[1])
        embed = Embed(c.vocab_size, c.d_model, c.compute_dtype, name="embed")
        x_BxSxD = _Positions(c, name="positions")(embed(tokens_BxS), positions_S)
        x_BxSxD = nn.Dropout(c.dropout, deterministic=not train)(x_BxSxD)
        x_BxSxD, _ = Stack(c, causal=False, deterministic=not train, name="blocks")(
            x_BxSxD, positions_S, valid=valid_BxS)
        if self.lm_head:
            return _head(c, embed, x_BxSxD, "lm_head")
        return _final_norm(c, x_BxSxD)


class EncoderDecoder(nn.Module):
    """Encoder-decoder (Vaswani et al. 2017): source [B,S], target [B,T] -> logits [B,T,V].

    Source and target share the vocabulary; the decoder has its own embedding, causal
    self-attention, and cross-attention to the encoder output in every layer.
    """
    cfg: GPTConfig

    @nn.compact
    def __call__(self, source_BxS, target_BxT, source_valid_BxS=None, *, train=False):
        c = self.cfg
        memory_BxSxD = Encoder(c, name="encoder")(source_BxS, source_valid_BxS, train=train)
        _check_length(c, target_BxT.shape[1], "the decoder input")
        positions_T = jnp.arange(target_BxT.shape[1])
        embed = Embed(c.vocab_size, c.d_model, c.compute_dtype, name="embed")
        x_BxTxD = _Positions(c, name="positions")(embed(target_BxT), positions_T)
        x_BxTxD = nn.Dropout(c.dropout, deterministic=not train)(x_BxTxD)
        x_BxTxD, _ = Stack(c, causal=True, cross=True, deterministic=not train,
                           name="decoder")(x_BxTxD, positions_T, context=memory_BxSxD,
                                           context_valid=source_valid_BxS)
        return _head(c, embed, x_BxTxD, "lm_head")
