"""The encoder-vs-decoder lesson: a bidirectional encoder and an encoder-decoder, built from
the same `GPTConfig`, blocks, positions and head as the decoder-only GPT (transformer.py)."""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from jaxcourse.models.layers import Embed
from jaxcourse.models.block import Stack
from jaxcourse.models.transformer import (GPTConfig, Positions, check_length, final_norm,
                                          output_head)


class Encoder(nn.Module):
    """Bidirectional encoder (BERT-style): tokens [B,S] -> hidden [B,S,D] (or MLM logits).

    `valid` [B,S] marks real tokens; padding keys are never attended to. Instead of token
    ids it takes embeddings (`embeddings_BxSxD`, e.g. ViT patches or another tower's output):
    the same blocks then encode any modality.
    """
    cfg: GPTConfig
    lm_head: bool = False

    @nn.compact
    def __call__(self, tokens_BxS=None, valid_BxS=None, *, train: bool = False,
                 embeddings_BxSxD=None):
        c = self.cfg
        if (tokens_BxS is None) == (embeddings_BxSxD is None):
            raise ValueError("Encoder takes token ids or embeddings_BxSxD (exactly one)")
        embed = None
        if tokens_BxS is not None or self.lm_head:
            embed = Embed(c.vocab_size, c.d_model, c.compute_dtype, name="embed")
        x_BxSxD = embed(tokens_BxS) if tokens_BxS is not None else embeddings_BxSxD
        check_length(c, x_BxSxD.shape[1], "the encoder input")
        positions_S = jnp.arange(x_BxSxD.shape[1])
        x_BxSxD = Positions(c, name="positions")(x_BxSxD.astype(c.compute_dtype), positions_S)
        x_BxSxD = nn.Dropout(c.dropout, deterministic=not train)(x_BxSxD)
        x_BxSxD, _ = Stack(c, causal=False, deterministic=not train, name="blocks")(
            x_BxSxD, positions_S, valid=valid_BxS)
        if self.lm_head:
            return output_head(c, embed, x_BxSxD, "lm_head")
        return final_norm(c, x_BxSxD)


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
        check_length(c, target_BxT.shape[1], "the decoder input")
        positions_T = jnp.arange(target_BxT.shape[1])
        embed = Embed(c.vocab_size, c.d_model, c.compute_dtype, name="embed")
        x_BxTxD = Positions(c, name="positions")(embed(target_BxT), positions_T)
        x_BxTxD = nn.Dropout(c.dropout, deterministic=not train)(x_BxTxD)
        x_BxTxD, _ = Stack(c, causal=True, cross=True, deterministic=not train,
                           name="decoder")(x_BxTxD, positions_T, context=memory_BxSxD,
                                           context_valid=source_valid_BxS)
        return output_head(c, embed, x_BxTxD, "lm_head")
