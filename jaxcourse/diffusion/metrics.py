"""Sample quality judged by a trained classifier: class accuracy and a Fréchet distance.

The Fréchet distance between Gaussians fitted to two feature sets (Heusel et al. 2017,
the "FID" recipe, here with our own digits classifier instead of Inception):

    d^2 = |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2))

tr((S_a S_b)^(1/2)) is computed as the sum of square roots of the eigenvalues of the
symmetric PSD matrix S_a^(1/2) S_b S_a^(1/2), which has the same spectrum as S_a S_b and
avoids the non-symmetric matrix square root (float64, numpy).
"""
from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxcourse.errors import UserError


def _psd_sqrt(m: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((m + m.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_from_stats(mu_a, cov_a, mu_b, cov_b) -> float:
    mu_a, mu_b = np.asarray(mu_a, np.float64), np.asarray(mu_b, np.float64)
    cov_a, cov_b = np.asarray(cov_a, np.float64), np.asarray(cov_b, np.float64)
    root_a = _psd_sqrt(cov_a)
    cross = np.linalg.eigvalsh(root_a @ cov_b @ root_a)
    tr_sqrt = np.sum(np.sqrt(np.clip(cross, 0.0, None)))
    d2 = np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a) + np.trace(cov_b) - 2.0 * tr_sqrt
    return float(max(d2, 0.0))


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two [N, D] feature sets."""
    feats_a, feats_b = np.asarray(feats_a, np.float64), np.asarray(feats_b, np.float64)
    if feats_a.ndim != 2 or feats_b.ndim != 2 or feats_a.shape[1] != feats_b.shape[1]:
        raise UserError(f"feature sets must be [N, D] with the same D, got {feats_a.shape} "
                        f"and {feats_b.shape}")
    if min(len(feats_a), len(feats_b)) < 2:
        raise UserError("the Fréchet distance needs at least 2 samples per set")
    return frechet_from_stats(feats_a.mean(0), np.cov(feats_a, rowvar=False),
                              feats_b.mean(0), np.cov(feats_b, rowvar=False))


def penultimate(model: nn.Module, variables, x, **kwargs):
    """(logits, features): features are the input of the model's last Dense layer.

    Any classifier whose head is a final `nn.Dense` works unchanged (chapter 2's MLP, CNN and
    ResNet): a method interceptor records that layer's input while the model runs.
    """
    seen = []

    def record(next_fun, args, kw, context):
        if isinstance(context.module, nn.Dense) and context.method_name == "__call__":
            seen.append(args[0])
        return next_fun(*args, **kw)

    with nn.intercept_methods(record):
        logits = model.apply(variables, x, **kwargs)
    if not seen:
        raise UserError(f"{type(model).__name__} has no Dense head to take features from")
    return logits, seen[-1]


def make_judge(model: nn.Module, variables, batch_size: int = 512) -> Callable:
    """images [N, H, W, C] in [0, 1] -> (logits [N, K], features [N, D]) as numpy arrays."""
    fn = jax.jit(lambda x: penultimate(model, variables, x, train=False))

    def judge(images):
        logits, feats = [], []
        for i in range(0, len(images), batch_size):
            lg, ft = fn(jnp.asarray(images[i:i + batch_size]))
            logits.append(np.asarray(lg, np.float32))
            feats.append(np.asarray(ft, np.float32))
        return np.concatenate(logits), np.concatenate(feats)

    return judge
