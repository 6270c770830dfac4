"""MLA (DeepSeek-V2 latent attention): token-by-token decode equals the full forward, the
cache holds only the latent and the rope key, cache bytes per token vs MHA / GQA / MQA."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcourse.errors import UserError
from jaxcourse.lm.params import cache_bytes_per_token
from jaxcourse.models import decode
from jaxcourse.models.transformer import GPT, GPTConfig, gpt_config, model_section

MLA = GPTConfig(vocab_size=13, context=12, n_layer=1, n_head=4, d_model=32, mixer="mla",
                options=(("mla", {"kv_rank": 8, "rope_dim": 4, "q_rank": 16}),))


def test_mla_decode_token_by_token_equals_full_forward():
    cfg = MLA
    params = nn.meta.unbox(jax.jit(GPT(cfg).init)(jax.random.key(0),
                                                  np.zeros((1, 4), np.int32))["params"])
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 12), dtype=np.int32)

    @jax.jit
    def both(params, tokens):
        full = GPT(cfg).apply({"params": params}, tokens)
        cache, first = decode.prefill(GPT(cfg), params, tokens[:, :3], 12)

        def body(cache, tok):
            cache, logits = decode.cached_step(GPT(cfg), params, cache, tok)
            return cache, logits
        cache, rest = jax.lax.scan(body, cache, tokens[:, 3:].T)
        return full, jnp.concatenate([first[:, None], rest[:-1].transpose(1, 0, 2)], 1), cache

    full, stepped, cache = both(params, tokens)
    np.testing.assert_allclose(stepped, full[:, 2:-1], atol=1e-4, rtol=1e-4)
    assert set(cache["layers"][0]) == {"c_kv", "k_rope"}
    assert cache["layers"][0]["c_kv"].shape == (1, 2, 12, 8)  # [L, B, S, R]


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_cache_bytes_per_token_formula(kv_heads):
    base = dict(vocab_size=13, context=12, n_layer=3, n_head=4, d_model=32)
    attn = GPTConfig(**base, n_kv_head=kv_heads)
    head_dim = 8
    assert cache_bytes_per_token(attn) == 3 * 2 * kv_heads * head_dim * 4  # L * (K + V) * f32
    assert cache_bytes_per_token(attn, jnp.int8) == 3 * 2 * kv_heads * (head_dim + 4)
    mla = dataclasses.replace(MLA, **base)
    assert cache_bytes_per_token(mla) == 3 * (8 + 4) * 4  # L * (R + dr) * f32


def test_mla_options_from_config_and_bad_values():
    cfg = gpt_config(model_section(mixer="mla", n_head=2, d_model=16, vocab_size=7))
    assert cfg.options_for("mixer", "mla").kv_rank == 32
    with pytest.raises(UserError, match="rope_dim"):
        gpt_config(model_section(mixer="mla", vocab_size=7, mla={"kv_rank": 8, "rope_dim": 3,
                                                                 "q_rank": 0}))
    with pytest.raises(UserError, match="unknown model.mla keys"):
        gpt_config(model_section(mixer="mla", vocab_size=7, mla={"rank": 8}))

