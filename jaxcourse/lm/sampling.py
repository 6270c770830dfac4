"""Text from a GPT: a prompt, then sampled tokens (temperature, top-k, top-p), past the context."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxcourse.models import decode
from jaxcourse.models.transformer import GPT, GPTConfig


def sample_text(model_cfg: GPTConfig, params, tok, prompt: str, n_tokens: int, *,
                temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                seed: int = 0) -> str:
    """The prompt followed by `n_tokens` sampled tokens (an empty prompt conditions on
    token 0). Past the context, each further chunk is conditioned on the last
    context/2 tokens (nanoGPT's crop), so a long sample reuses two or three compiled decode
    loops; a prompt of a whole context or more is cropped the same way."""
    context = model_cfg.context
    ids = tok.encode(prompt) or [0]
    ids = ids if len(ids) < context else ids[-(context // 2):]
    start, key = len(ids), jax.random.key(seed)
    while len(ids) - start < n_tokens:
        window = ids if len(ids) == start else ids[-(context // 2):]
        n = min(context - len(window), n_tokens - (len(ids) - start))
        key, sub = jax.random.split(key)
        out = decode.generate(GPT(model_cfg), params, jnp.asarray([window], jnp.int32), sub,
                              max_new_tokens=n, temperature=temperature, top_k=top_k,
                              top_p=top_p)
        ids += np.asarray(out[0]).tolist()
    return prompt + tok.decode(ids[start:])
