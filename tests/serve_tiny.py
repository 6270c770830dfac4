"""The tiny model and engine the serve tests share (same shapes: compiled once per process).

A random 2-layer GPT with grouped-query attention, context 32, over 40 characters; an engine
of 3 slots, 4 tokens per decode call, blocks of 4 tokens and a pool of 16 blocks (two whole-context sequences at once).
"""
import string

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxcourse.data.tokenizers import CharTokenizer
from jaxcourse.models.transformer import GPT, GPTConfig
from jaxcourse.serve.engine import Engine

TOK = CharTokenizer(string.ascii_lowercase + string.digits + " .,\n")
CFG = GPTConfig(vocab_size=TOK.vocab_size, context=32, n_layer=2, n_head=4, n_kv_head=2,
                d_model=32)


def tiny_params():
    return nn.meta.unbox(GPT(CFG).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"])


def tiny_engine(params, metrics=None) -> Engine:
    eng = Engine(CFG, params, slots=3, block_size=4, num_blocks=17, buckets=(8, 32),
                 decode_steps=4, decode_text=TOK.decode, metrics=metrics)
    eng.warmup()
    return eng
