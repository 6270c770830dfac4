"""Throughput math: FLOPs per token of a GPT, model FLOPs utilization (MFU), peak FLOP/s.

Counting matmuls only (everything else is a few percent), one token of a GPT forward pass
costs, per layer, with d = d_model, H heads of size h (H*h = d), K kv heads, F = d_ff,
T = context:
    q, k, v, out projections   2*d*H*h + 2*2*d*K*h + 2*H*h*d
    attention scores  QK^T     2*T*H*h     (XLA computes the full T x T square, masked)
    weighted values   AV       2*T*H*h
    MLP                        2*2*d*F (GELU) or 3*2*d*F (SwiGLU)
plus the vocabulary projection 2*d*V once. Training is forward + backward, and the backward
of a matmul is two matmuls of the same size, so train FLOPs = 3 x forward. With N = the
non-embedding parameter count this is the familiar 6N + 12*L*T*d (Kaplan et al. 2020;
PaLM, Chowdhery et al. 2022, appendix B) plus 6*d*V for the head.

MFU = (tokens/s x train FLOPs per token) / peak FLOP/s of the hardware. It counts only the
model's useful FLOPs: remat recomputation and padding do not raise it.
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp

# Dense bf16 peak FLOP/s per chip, from the vendors' data sheets.
PEAK_FLOPS = {"H100 SXM": 989e12, "H200": 989e12, "A100": 312e12, "TPU v4": 275e12,
              "TPU v5e": 197e12}


def gpt_forward_flops_per_token(cfg, seq_len: int) -> dict[str, float]:
    """Matmul FLOPs of one token's forward pass, by part (cfg: a GPTConfig)."""
    d, hd, h, k = cfg.d_model, cfg.head_dim, cfg.n_head, cfg.kv_heads
    proj = 2 * d * h * hd + 2 * 2 * d * k * hd + 2 * h * hd * d
    attention = 2 * 2 * seq_len * h * hd
    mlp = (3 if cfg.ffn == "swiglu" else 2) * 2 * d * cfg.ff_dim
    return {"projections": cfg.n_layer * proj, "attention": cfg.n_layer * attention,
            "mlp": cfg.n_layer * mlp, "head": 2 * d * cfg.vocab_size}


def gpt_train_flops_per_token(cfg, seq_len: int) -> float:
    """Forward + backward matmul FLOPs per token: 3 x forward."""
    return 3.0 * sum(gpt_forward_flops_per_token(cfg, seq_len).values())


def kaplan_flops_per_token(n_nonembed_params: int, cfg, seq_len: int) -> float:
    """6N + 12*L*T*d (+ 6*d*V for the output head), the usual back-of-envelope count."""
    return (6.0 * n_nonembed_params + 12.0 * cfg.n_layer * seq_len * cfg.d_model
            + 6.0 * cfg.d_model * cfg.vocab_size)


def mfu(tokens_per_second: float, flops_per_token: float, peak_flops: float) -> float:
    """Model FLOPs utilization in [0, 1]."""
    return tokens_per_second * flops_per_token / peak_flops


def compiled_flops(compiled) -> float:
    """FLOPs XLA's cost model counts for a lowered or compiled function."""
    cost = compiled.cost_analysis()
    if isinstance(cost, list):  # Older jax: one dict per device.
        cost = cost[0]
    return float(cost.get("flops", float("nan")))


def measure_peak_flops(n: int = 1024, dtype=jnp.float32, repeats: int = 5) -> float:
    """Achievable matmul FLOP/s on the default device: the best of `repeats` n x n matmuls.

    Used as the 'peak' for CPU MFU, where no data-sheet number applies.
    """
    a = jnp.ones((n, n), dtype)
    b = jnp.ones((n, n), dtype)
    matmul = jax.jit(lambda a, b: a @ b)
    matmul(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, b).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2.0 * n ** 3 / best
